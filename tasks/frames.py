"""Where frames came from: each frame's number and time in the source video, for every stage that shows or stores
frames (timestamps of depth and audio embeddings, the labels above the tiles of a contact sheet)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import zarr

from reelflow.schemas.kinds import VideoFrames
from reelflow.storage.store import ArtifactStore

_SEARCHED_ARTIFACTS = 16  # how far up the provenance a frames artifact's source video is looked for
logger = logging.getLogger(__name__)


def frame_times(store: ArtifactStore, frames: zarr.Group) -> np.ndarray:
    """Each frame's time in the source video, seconds ``(F,)``: its source index over the source's frame rate.

    Frames made by a stage (an edit) take the times of the decoded frames they descend from (the nearest
    artifact up their provenance with a ``frame_index``) when they are as many, else its start plus
    one frame period each; NaN when no decoded frames are found.
    """
    count = frames["frames"].shape[0]
    source = decoded_frames(store, frames)
    if source is None:
        logger.warning("no decoded video up the provenance of these %d frames; their timestamps are NaN", count)
        return np.full(count, np.nan)
    video = VideoFrames.read(source.attrs.asdict())
    if source["frame_index"].shape[0] == count:
        return np.asarray(source["frame_index"][:], np.float64) / float(Fraction(video.source_video.fps))
    return video.start + np.arange(count) / float(Fraction(video.fps))


def decoded_frames(store: ArtifactStore, group: zarr.Group) -> zarr.Group | None:
    """The nearest artifact at or above ``group`` (breadth first through provenance inputs) holding decoded frames."""
    queue, seen = deque([group]), 0
    while queue and seen < _SEARCHED_ARTIFACTS:
        current, seen = queue.popleft(), seen + 1
        if "frame_index" in current:
            return current
        inputs = current.attrs.get("provenance", {}).get("inputs", {})
        for slot, ref in inputs.items():
            if not slot.startswith("source:") and store.is_complete(ref["stage"], ref["key"]):
                queue.append(store.open(ref["stage"], ref["key"]))
    return None


def frame_labels(store: ArtifactStore, frames: zarr.Group, positions: Sequence[int]) -> list[str]:
    """``frame N · T s`` for the frames at ``positions`` of a frames (or latents) artifact: their number and time in
    the source video (see :func:`frame_times`), or their position where no decoded frames are found up its
    provenance, or they are not as many."""
    try:
        source = decoded_frames(store, frames)
        count = next(frames[name].shape[0] for name in ("frames", "latents") if name in frames)
        if source is None or source["frame_index"].shape[0] != count:
            return [f"#{i}" for i in positions]
        numbers = np.asarray(source["frame_index"][:])
        fps = float(Fraction(VideoFrames.read(source.attrs.asdict()).source_video.fps))
        return [f"frame {numbers[i]} · {numbers[i] / fps:.2f} s" for i in positions]
    except Exception as exc:  # noqa: BLE001  (a label must never fail a stage that has done its work)
        logger.warning("no frame labels: %s", exc)
        return [f"#{i}" for i in positions]
