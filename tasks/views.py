"""Views every stage's card gets without its method drawing them: thumbnails of the frames or latents it stored, and a
strip of a sampler's latents a few steps apart (inversion, denoising), drawn cheaply in false colour, no VAE.

Both are pictures of the store like any other (see tasks.artifacts), so a cached stage's card shows them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import zarr

from reelflow.tasks.artifacts import contact_sheet, latent_view, spread
from reelflow.tasks.frames import frame_labels

STRIP_STEPS = 6  # steps shown in a sampler's strip
LATENT_KEY = "false colour: the latents' first three principal components (red, green, blue), 1st to 99th percentile"
logger = logging.getLogger(__name__)

Picture = Callable[[str, bytes], str]  # (name, png) -> markdown, as StageContext.picture


class StepStrip:
    """The latents of the middle frame after a few steps of a sampler, spread from its first step to its last.

    A stage calls :meth:`start` with its step count, then :meth:`keep` after every step (cheap: it copies
    one frame of the steps it shows); a stage in parts (windows, chunks of frames) passes the part, and the
    strip shows the first part that kept a step. The card draws the strip (:meth:`markdown`) under what the
    stage published.
    """

    def __init__(self) -> None:
        self.title, self.total, self.kept, self.part = "", 0, {}, None

    def start(self, total: int, title: str) -> None:
        if not self.total:  # the first part's steps
            self.title, self.total = title, total

    def keep(self, step: int, latents: torch.Tensor | np.ndarray, label: str, part: int = 0) -> None:
        """Keep ``latents`` ``(F, C, h, w)`` (a leading batch of one is dropped) after ``step`` (0-based) of ``part``."""
        if self.part is None:
            self.part = part
        if part != self.part or step in self.kept or step not in spread(self.total, STRIP_STEPS):
            return
        frames = latents.detach().float().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents, np.float32)
        frames = frames.reshape(-1, *frames.shape[-3:])
        self.kept[step] = (label, frames[len(frames) // 2].copy())

    def markdown(self, picture: Picture) -> str | None:
        if not self.kept:
            return None
        steps = sorted(self.kept)
        tiles = latent_view(np.stack([self.kept[k][1] for k in steps]))
        sheet = contact_sheet(tiles, labels=[self.kept[k][0] for k in steps], columns=len(steps))
        return f"**{self.title}**: the middle frame's latents after these steps ({LATENT_KEY})\n\n{picture('steps', sheet)}"


def thumbnails(group: zarr.Group, store: object, picture: Picture) -> list[str]:
    """A few of the frames (``frames``, uint8 ``(F, H, W, 3)``) and latents (``latents``, ``(F, C, h, w)``) that a
    stage stored at its top level, spread over the clip and labelled by source frame; none for other arrays."""
    sections = []
    frames, latents = group.get("frames"), group.get("latents")
    if isinstance(frames, zarr.Array) and frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8:
        shown = spread(frames.shape[0])
        sheet = contact_sheet(np.asarray(frames.oindex[shown]), labels=frame_labels(store, group, shown))
        sections.append(f"**frames** ({frames.shape[0]} at {frames.shape[2]}x{frames.shape[1]})\n\n{picture('frames', sheet)}")
    if isinstance(latents, zarr.Array) and latents.ndim == 4:
        shown = spread(latents.shape[0])
        tiles = latent_view(np.asarray(latents.oindex[shown], np.float32))
        sheet = contact_sheet(tiles, labels=frame_labels(store, group, shown))
        sections.append(f"**latents** {tuple(latents.shape)} ({LATENT_KEY})\n\n{picture('latents', sheet)}")
    elif isinstance(latents, zarr.Array) and latents.ndim == 5:  # by window (Wan): the first window's latent frames
        shown = spread(latents.shape[1])
        tiles = latent_view(np.asarray(latents[0], np.float32)[shown])
        sheet = contact_sheet(tiles, labels=[f"latent frame {i}" for i in shown])
        sections.append(f"**latents** {tuple(latents.shape)}, the first of {latents.shape[0]} windows ({LATENT_KEY})\n\n"
                        f"{picture('latents', sheet)}")
    return sections
