"""estimate_depth: each frame's inverse depth, predicted in batches and normalised over the clip."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import zarr

from reelflow.core.depth.estimate import Predictor, depth_predictor, estimate, normalise_depth
from reelflow.schemas.calls import StageCall
from reelflow.schemas.depth import DepthMaps, EstimateDepthParams
from reelflow.schemas.errors import ModelError
from reelflow.schemas.refs import ArtifactRef
from reelflow.tasks.artifacts import contact_sheet, spread
from reelflow.tasks.frames import frame_labels, frame_times
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

DIMS = ("frame", "y", "x")
SHOWN_FRAMES = 8
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
    ctx.progress.start(count, unit="frames")
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


def _publish(ctx: StageContext, frames: zarr.Array, depth: zarr.Array, p: EstimateDepthParams) -> None:
    """Up to eight frames, evenly spaced, above their depth as a heat map, for the UI."""
    shown = spread(frames.shape[0], SHOWN_FRAMES)
    picture = ctx.picture("depth", contact_sheet(np.asarray(frames.oindex[shown]),
                                                 [np.asarray(depth.oindex[shown], np.float32)],
                                                 labels=frame_labels(ctx.store, ctx.input("frames"), shown)))  # fmt: skip
    said = "one scale and shift for the clip" if p.normalise == "video" else "each frame on its own"
    ctx.publish(f"**inverse depth** (near is "
                     f"bright), normalised {said}\n\n{picture}")  # fmt: skip
