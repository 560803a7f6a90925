"""What a stage shows in the Prefect UI: markdown summaries with pictures embedded as PNG data URLs.

Embedded pictures need no server, so they render wherever the run's artifacts are opened; outside
a Prefect task run (``task.fn()`` in tests) nothing is published.
"""

from __future__ import annotations

import base64
import io
import re

import numpy as np
from PIL import Image
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

MIN_TILE = 96


def contact_sheet(frames: np.ndarray) -> bytes:
    """PNG of frames side by side: ``(F, h, w)`` in [0, 1] (drawn as a heat map) or uint8 ``(F, h, w, 3)``."""
    if frames.ndim == 3:
        frames = _heat(frames.astype(np.float32))
    scale = max(1, MIN_TILE // frames.shape[1])
    tiles = [np.kron(frame, np.ones((scale, scale, 1), dtype=np.uint8)) for frame in frames]
    sheet = np.concatenate([np.pad(t, ((0, 0), (0, 2), (0, 0)), constant_values=255) for t in tiles], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, format="PNG")
    return buffer.getvalue()


def png_markdown(title: str, png: bytes) -> str:
    return f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})"


def publish_markdown(name: str, markdown: str, description: str = "") -> None:
    """A keyed markdown artifact (``name`` is made a valid key), only inside a Prefect task run."""
    if TaskRunContext.get() is None:
        return
    key = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:100]
    create_markdown_artifact(markdown, key=key, description=description)


def _heat(values: np.ndarray) -> np.ndarray:
    """Black -> red -> yellow -> white colour map of values in [0, 1], uint8 ``(..., 3)``."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)
