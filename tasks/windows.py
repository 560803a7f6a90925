"""Windowed, resumable stages: compute a long clip window by window, skipping the windows already stored.

A stage body calls :func:`run_windows` with a :class:`~reelflow.core.windows.WindowPlan`, the output
array and a function that computes one window. Each window's output is stitched into the artifact
(see :func:`~reelflow.core.windows.stitch_window`) and marked done; after a crash the next attempt
reopens the partial artifact (the stage runs with ``run_stage(..., resumable=True)``) and computes only
the windows not marked done. Only one window's inputs and outputs are in memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable

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
    ctx: StageContext, plan: WindowPlan, out: zarr.Array, compute: Callable[[Window], np.ndarray]
) -> list[int]:
    """Compute and stitch every window of ``out``'s frames not done yet; returns the indices computed."""
    windows = plan.windows(out.shape[0])
    tails = ctx.writer.create_array(
        TAILS, shape=(2, plan.length, *out.shape[1:]), dtype=out.dtype, dims=("slot", "window_frame", *_dims(out)[1:]),
        chunks=(1, plan.length, *out.shape[1:]),
    )  # fmt: skip
    computed = []
    ctx.progress.start(len(windows))
    for window in windows:
        part = f"window-{window.index}"
        if not ctx.writer.is_done(part):
            stitch_window(plan, window, compute(window), out, tails)
            ctx.writer.mark_done(part)
            computed.append(window.index)
        ctx.progress.advance()
    del ctx.writer.group[TAILS]
    ctx.record(windows={"count": len(windows), "length": plan.length, "overlap": plan.overlap,
                        "anchor": plan.anchor, "stitch": plan.stitch, "computed": computed})  # fmt: skip
    return computed


def _dims(array: zarr.Array) -> tuple[str, ...]:
    return tuple(array.metadata.dimension_names or (f"dim_{i}" for i in range(array.ndim)))
