"""estimate_depth: each frame's inverse depth, predicted in batches and normalised over the clip."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import zarr

from reelflow.core.depth.estimate import Predictor, depth_predictor, estimate, normalise_depth
from reelflow.schemas.calls import StageCall
from reelflow.schemas.depth import DepthMaps, EstimateDepthParams
from reelflow.schemas.errors import ModelError
from reelflow.schemas.kinds import VideoFrames
from reelflow.schemas.refs import ArtifactRef
from reelflow.storage.store import ArtifactStore
from reelflow.tasks.artifacts import contact_sheet, publish_markdown
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

DIMS = ("frame", "y", "x")
SHOWN_FRAMES = 8
_SEARCHED_ARTIFACTS = 16  # how far up the provenance a frames artifact's source video is looked for
logger = logging.getLogger(__name__)


@stage_task("estimate_depth")
def estimate_depth(call: StageCall) -> ArtifactRef:
    """Inverse depth in [0, 1] ``depth (F, H, W)`` (float16), the model's raw inverse depth ``raw_depth (F, H, W)``
    (float32) and each frame's time in the source video ``timestamp (F,)`` (seconds)."""
    return run_stage(call, _estimate)


def _estimate(ctx: StageContext) -> DepthMaps:
    p: EstimateDepthParams = ctx.call.stage.params
    source = ctx.input("frames")
    frames = source["frames"]
    predictor = load_predictor(ctx).with_input_size(p.input_size)
    count, height, width, _ = frames.shape
    raw = ctx.writer.create_array("raw_depth", shape=(count, height, width), dtype=np.float32, dims=DIMS)
    depth = ctx.writer.create_array("depth", shape=(count, height, width), dtype=np.float16, dims=DIMS)
    ctx.progress.start(count)
    for start, chunk in estimate(predictor, frames, batch_size=p.batch_size):
        raw[start : start + len(chunk)] = chunk
        ctx.progress.advance(len(chunk))
    low, high = normalise_depth(raw, depth, mode=p.normalise, chunk_size=p.batch_size)
    ctx.writer.write_array("timestamp", frame_times(ctx.store, source), dims=("frame",), dtype=np.float64)
    _publish(ctx, frames, depth, p)
    size = predictor.input_size(height, width)
    return DepthMaps(normalisation=p.normalise, backend=predictor.backend, input_size=size, raw_min=low, raw_max=high)


def _transformers(ctx: StageContext) -> Predictor:
    model = ctx.model("depth", cls="AutoModelForDepthEstimation")
    return depth_predictor(model, ctx.model("depth", "image_processor"))


def _midas(ctx: StageContext) -> Predictor:
    return depth_predictor(ctx.model("depth"))


LOADERS: dict[str, Callable[[StageContext], Predictor]] = {"transformers": _transformers, "midas": _midas}


def load_predictor(ctx: StageContext) -> Predictor:
    """The depth role's model (and its processor) as a predictor, loaded the way its family loads depth models."""
    family = ctx.call.models["depth"].family
    if family not in LOADERS:
        raise ModelError(f"estimate_depth cannot load a {family} model as its depth model; use one of the families "
                         f"{', '.join(LOADERS)}")  # fmt: skip
    return LOADERS[family](ctx)


def frame_times(store: ArtifactStore, frames: zarr.Group) -> np.ndarray:
    """Each frame's time in the source video, seconds ``(F,)``: its source index over the source's frame rate.

    Frames made by a stage (an edit) take the times of the decoded frames they descend from (the nearest
    artifact up their provenance with a ``frame_index``) when they are as many, else its start plus
    one frame period each; NaN when no decoded frames are found.
    """
    count = frames["frames"].shape[0]
    source = _decoded_frames(store, frames)
    if source is None:
        logger.warning("no decoded video up the provenance of these %d frames; their timestamps are NaN", count)
        return np.full(count, np.nan)
    video = VideoFrames.read(source.attrs.asdict())
    if source["frame_index"].shape[0] == count:
        return np.asarray(source["frame_index"][:], np.float64) / float(Fraction(video.source_video.fps))
    return video.start + np.arange(count) / float(Fraction(video.fps))


def _decoded_frames(store: ArtifactStore, group: zarr.Group) -> zarr.Group | None:
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


def _publish(ctx: StageContext, frames: zarr.Array, depth: zarr.Array, p: EstimateDepthParams) -> None:
    """Up to eight frames, evenly spaced, above their depth as a heat map, for the UI."""
    shown = np.unique(np.linspace(0, frames.shape[0] - 1, min(SHOWN_FRAMES, frames.shape[0])).round().astype(int))
    picture = ctx.picture("depth", contact_sheet(np.asarray(frames.oindex[shown]),
                                                 [np.asarray(depth.oindex[shown], np.float32)]))  # fmt: skip
    said = "one scale and shift for the clip" if p.normalise == "video" else "each frame on its own"
    publish_markdown(f"{ctx.call.stage_id}-{ctx.call.key[:8]}", f"### `{ctx.call.stage_id}`: inverse depth (near is "
                     f"bright), normalised {said}; frames {', '.join(map(str, shown))}\n\n{picture}",
                     description="depth per frame")  # fmt: skip
