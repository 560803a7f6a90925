"""Windowed, resumable stages: compute a long clip window by window, skipping the windows already stored.

A stage body calls :func:`run_windows` with a :class:`~reelflow.core.windows.WindowPlan`, the output
array and a function that computes one window. Each window's output is stitched into the artifact
(see :func:`~reelflow.core.windows.stitch_window`) and marked done; after a crash the next attempt
reopens the partial artifact (the stage runs with ``run_stage(..., resumable=True)``) and computes only
the windows not marked done. Only one window's inputs and outputs are in memory at a time.

A chained stage (``chain=True``) computes each window from the previous window's output too: its
``compute(window, previous)`` gets the earlier window's result on the frames the two share
(``None`` for the first window), read from the stored tails, so a resumed run chains exactly as an
uninterrupted one (an image-to-video model conditioned on the last frame it made, say).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

from reelflow.core.windows import Window, WindowPlan, stitch_window
from reelflow.tasks.runtime import StageContext

TAILS = "window_tails"  # scratch: the last window's overlapping frames, removed at the end


def read_window(array: zarr.Array, window: Window) -> np.ndarray:
    """The frames ``window`` is computed on (the anchor first, if prepended), read from ``array``."""
    own = np.asarray(array[window.start : window.stop])
    if window.anchor is None:
        return own
    return np.concatenate([np.asarray(array[window.anchor : window.anchor + 1]), own])


def run_windows(
    ctx: StageContext, plan: WindowPlan, out: zarr.Array, compute: Callable[..., np.ndarray], *, chain: bool = False
) -> list[int]:
    """Compute and stitch every window of ``out``'s frames not done yet; returns the indices computed.

    ``compute(window)`` returns the window's result on ``window.frames``; with ``chain``,
    ``compute(window, previous)`` also gets the previous window's result on its first ``window.head``
    frames (None for the first window; needs windows that overlap).
    """
    if chain and plan.overlap < 1:
        raise ValueError("chained windows must overlap by at least one frame: the frames they share carry the chain")
    windows = plan.windows(out.shape[0])
    tails = ctx.writer.create_array(
        TAILS, shape=(2, plan.length, *out.shape[1:]), dtype=out.dtype, dims=("slot", "window_frame", *_dims(out)[1:]),
        chunks=(1, plan.length, *out.shape[1:]),
    )  # fmt: skip
    computed = []
    ctx.progress.start(len(windows), unit="windows")
    for window in windows:
        part = f"window-{window.index}"
        if not ctx.writer.is_done(part):
            args: tuple[Any, ...] = (window, _previous(tails, window)) if chain else (window,)
            stitch_window(plan, window, compute(*args), out, tails)
            ctx.writer.mark_done(part)
            computed.append(window.index)
        ctx.progress.advance()
    del ctx.writer.group[TAILS]
    ctx.record(windows={"count": len(windows), "length": plan.length, "overlap": plan.overlap,
                        "anchor": plan.anchor, "stitch": plan.stitch, "last": plan.last, "computed": computed})  # fmt: skip
    return computed


def _previous(tails: zarr.Array, window: Window) -> np.ndarray | None:
    """The previous window's output on the frames it shares with ``window`` (stitching keeps them in ``tails``)."""
    return np.asarray(tails[(window.index - 1) % 2, : window.head]) if window.index else None


def _dims(array: zarr.Array) -> tuple[str, ...]:
    return tuple(array.metadata.dimension_names or (f"dim_{i}" for i in range(array.ndim)))
