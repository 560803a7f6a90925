"""The edit summary's preview: the source and the output side by side, playing, as one animated image.

An animated WebP (a few hundred KB at most), kept in the store beside the output frames' pictures
and linked like them (picture server, presigned URL or data URL), so the Prefect UI plays it in
the summary card with nothing else to serve. Frames are scaled down by a whole factor to at most
PREVIEW_SIDE pixels a side, and at most PREVIEW_FRAMES of them (evenly spaced) are kept.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from reelflow.flows.reports import Clip, scaled_down

PREVIEW_SIDE = 192
PREVIEW_FRAMES = 48
_GAP = 4


def side_by_side(source: Clip, output: Clip, max_bytes: int | None = None) -> bytes:
    """An animated WebP of each source frame beside its output frame, looping over the clip's duration; with
    ``max_bytes``, fewer frames (every second one, then every fourth, ...) until it fits, so an embedded preview
    still plays rather than being replaced by a still thumbnail."""
    count = min(len(source.frames), len(output.frames))
    shown = np.unique(np.linspace(0, count - 1, min(PREVIEW_FRAMES, count)).round().astype(int))
    while True:
        data = _animate(source, output, shown, count)
        if max_bytes is None or len(data) <= max_bytes or len(shown) <= 4:
            return data
        shown = shown[::2]


def _animate(source: Clip, output: Clip, shown: np.ndarray, count: int) -> bytes:
    left, right = scaled_down(source.frames[shown], PREVIEW_SIDE), scaled_down(output.frames[shown], PREVIEW_SIDE)
    height = max(left.shape[1], right.shape[1])
    pages = []
    for a, b in zip(left, right, strict=True):
        canvas = np.full((height, a.shape[1] + _GAP + b.shape[1], 3), 255, np.uint8)
        canvas[: a.shape[0], : a.shape[1]] = a
        canvas[: b.shape[0], a.shape[1] + _GAP :] = b
        pages.append(Image.fromarray(canvas))
    period = 1000.0 / float(source.fps) * (count / len(shown))  # the clip's duration, whatever was dropped
    buffer = io.BytesIO()
    pages[0].save(buffer, format="WEBP", save_all=True, append_images=pages[1:], duration=max(20, round(period)), loop=0,
                  quality=80, method=4)  # fmt: skip
    return buffer.getvalue()
