"""Frame windows: process a long clip in fixed-length pieces so memory stays flat as clips grow.

A :class:`WindowPlan` cuts ``F`` frames into windows of ``length`` frames that overlap their
neighbours by ``overlap`` frames; the last window is shorter when the clip does not divide evenly
(it always has more than ``overlap`` frames of its own), or, with ``last="full"``, as long as the
others and moved back to end at the clip's end, overlapping its neighbour more (for models that
need a fixed frame count, such as an image-to-video model; with an overlap above one frame it stops
short of the window two before it, so it can stay shorter). An ``anchor`` frame, when set, is prepended to every
window that does not already contain it, so every window sees one shared frame (the edited first
frame of Videoshop, the key frame of cross-frame attention) and stays consistent with the others;
its output is taken from the window that owns it.

Windows are stitched back by :func:`stitch_window`, one window at a time and in order, into an
output array. In an overlap the output is a cross-fade from the earlier window to the later one
(``blend``) or a hard cut in its middle (``cut``). The earlier window's overlapping frames wait in a
two-slot ``tails`` array until the next window is done, so every write is idempotent: a window
interrupted half-way and computed again produces exactly the output of an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Stitch = Literal["blend", "cut"]
Last = Literal["short", "full"]


@dataclass(frozen=True)
class Window:
    """One window: its own frames ``[start, stop)`` and the frames it is computed on (the anchor first)."""

    index: int
    start: int
    stop: int
    anchor: int | None  # the anchor frame prepended to this window, None when it is inside or unset
    head: int  # frames shared with the previous window
    tail: int  # frames shared with the next window

    @property
    def frames(self) -> list[int]:
        """Source frame indices the window is computed on, in order (the prepended anchor first)."""
        return ([self.anchor] if self.anchor is not None else []) + list(range(self.start, self.stop))

    def own(self, result: Any) -> Any:
        """The part of a result computed on :attr:`frames` that belongs to ``[start, stop)``."""
        return result[1:] if self.anchor is not None else result


@dataclass(frozen=True)
class WindowPlan:
    length: int
    overlap: int = 0
    anchor: int | None = None
    stitch: Stitch = "blend"
    last: Last = "short"

    def __post_init__(self) -> None:
        if self.length < 1 or not 0 <= 2 * self.overlap <= self.length:
            raise ValueError(
                f"a window plan needs length >= 1 and 0 <= overlap <= length / 2; got length {self.length}, "
                f"overlap {self.overlap}"
            )

    def windows(self, num_frames: int) -> list[Window]:
        """The windows covering ``num_frames`` frames, in order."""
        if num_frames < 1:
            raise ValueError(f"cannot cut {num_frames} frames into windows")
        if self.anchor is not None and not 0 <= self.anchor < num_frames:
            raise ValueError(f"anchor frame {self.anchor} is outside the clip's {num_frames} frames")
        step = self.length - self.overlap
        starts = list(range(0, max(num_frames - self.overlap, 1), step))
        spans = [(start, min(start + self.length, num_frames)) for start in starts]
        if self.last == "full" and len(spans) > 1:
            # Never back into the window two before: stitching keeps one earlier window's tail at a time.
            floor = spans[-3][1] if len(spans) > 2 else 0
            spans[-1] = (max(num_frames - self.length, floor, 0), num_frames)
        windows = []
        for index, (start, stop) in enumerate(spans):
            head = spans[index - 1][1] - start if index else 0
            tail = stop - spans[index + 1][0] if index + 1 < len(spans) else 0
            outside = self.anchor is not None and not start <= self.anchor < stop
            windows.append(Window(index, start, stop, self.anchor if outside else None, head, tail))
        return windows

    def weights(self, overlap: int) -> np.ndarray:
        """``(overlap,)`` weights of the earlier window across an overlap (the later one gets 1 - w)."""
        if self.stitch == "cut":
            return (np.arange(overlap) < (overlap + 1) // 2).astype(np.float32)
        return ((overlap - np.arange(overlap)) / (overlap + 1)).astype(np.float32)


def stitch_window(plan: WindowPlan, window: Window, result: Any, out: Any, tails: Any) -> None:
    """Write ``window``'s result into ``out`` (frames first), keeping its tail in ``tails`` for the next one.

    ``result`` is computed on ``window.frames``; ``out`` has the clip's frames on its first axis and
    ``tails`` has shape ``(2, plan.length, ...)``. Windows must be stitched in order; stitching one
    again (after a crash) gives the same ``out``.
    """
    own = np.asarray(window.own(result))
    body_start = window.head
    body_stop = own.shape[0] - window.tail
    if window.head:
        w = plan.weights(window.head).reshape(-1, *([1] * (own.ndim - 1)))
        earlier = np.asarray(tails[(window.index - 1) % 2][: window.head])
        mixed = w * earlier.astype(np.float32) + (1 - w) * own[: window.head].astype(np.float32)
        out[window.start : window.start + window.head] = _cast(mixed, own.dtype)
    out[window.start + body_start : window.start + body_stop] = own[body_start:body_stop]
    if window.tail:
        tails[window.index % 2, : window.tail] = own[body_stop:]


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        return values.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(values.round(), info.min, info.max).astype(dtype)
