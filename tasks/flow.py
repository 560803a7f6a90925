"""estimate_flow (raft, farneback): optical flow of every neighbouring frame pair both ways, with occlusion,
written a chunk of pairs at a time (resumable by chunk)."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.utils import flow_to_image

from reelflow.core.flow.estimate import Farneback, FlowFn, pair_flows, raft_flow
from reelflow.core.flow.warp import CONSISTENCY_ABSOLUTE, CONSISTENCY_RELATIVE, occlusion
from reelflow.schemas.calls import StageCall
from reelflow.schemas.flow import FlowFields
from reelflow.schemas.refs import ArtifactRef
from reelflow.tasks.artifacts import contact_sheet, spread
from reelflow.tasks.preflight import PreflightContext, stage_check
from reelflow.tasks.frames import frame_labels
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

SHOWN_PAIRS = 8
RAFT_ARCHITECTURES = ("raft_large", "raft_small")


@stage_task("estimate_flow", "raft")
def estimate_flow_raft(call: StageCall) -> ArtifactRef:
    """RAFT flow ``forward``/``backward (F-1, 2, H, W)`` (pixels, float32) and ``occluded_forward``/``occluded_backward
    (F-1, H, W)`` (bool). Resumable by chunk of pairs."""
    return run_stage(call, _raft, resumable=True)


@stage_task("estimate_flow", "farneback")
def estimate_flow_farneback(call: StageCall) -> ArtifactRef:
    """OpenCV Farneback flow, stored as method ``raft`` stores it. Resumable by chunk of pairs."""
    return run_stage(call, _farneback, resumable=True)


def _raft(ctx: StageContext) -> FlowFields:
    return _estimate(ctx, raft_flow(ctx.model("flow"), ctx.call.stage.params.num_flow_updates), "torchvision:RAFT")


def _farneback(ctx: StageContext) -> FlowFields:
    p = ctx.call.stage.params
    settings = Farneback(p.pyr_scale, p.levels, p.winsize, p.iterations, p.poly_n, p.poly_sigma)
    return _estimate(ctx, settings, "opencv:farneback")


def _estimate(ctx: StageContext, flow: FlowFn, backend: str) -> FlowFields:
    frames = ctx.input("frames")["frames"]
    count, height, width = frames.shape[:3]
    pairs, batch = count - 1, ctx.call.stage.params.batch_size
    chunks = (min(batch, pairs), 2, height, width)
    arrays = {name: ctx.writer.create_array(name, shape=(pairs, 2, height, width), dtype=np.float32, chunks=chunks,
                                            dims=("pair", "direction_xy", "y", "x"))
              for name in ("forward", "backward")}  # fmt: skip
    arrays |= {name: ctx.writer.create_array(name, shape=(pairs, height, width), dtype=bool, chunks=(chunks[0], height, width),
                                             dims=("pair", "y", "x"))
               for name in ("occluded_forward", "occluded_backward")}  # fmt: skip
    ctx.progress.start(pairs, unit="frame pairs")
    for start in range(0, pairs, batch):
        stop = min(start + batch, pairs)
        if not ctx.writer.is_done(f"pairs-{start}"):
            forward, backward = pair_flows(flow, np.asarray(frames[start : stop + 1]))
            arrays["forward"][start:stop] = forward.numpy()
            arrays["backward"][start:stop] = backward.numpy()
            arrays["occluded_forward"][start:stop] = occlusion(forward, backward).numpy()
            arrays["occluded_backward"][start:stop] = occlusion(backward, forward).numpy()
            ctx.writer.mark_done(f"pairs-{start}")
        ctx.progress.advance(stop - start)
    ctx.writer.write_array("pair_frames", np.stack([np.arange(pairs), np.arange(1, count)], axis=1), dims=("pair", "end"),
                           dtype=np.int32)  # fmt: skip
    _publish(ctx, frames, arrays["forward"], arrays["occluded_forward"], backend)
    return FlowFields(backend=backend, consistency=(CONSISTENCY_RELATIVE, CONSISTENCY_ABSOLUTE))


def _publish(ctx: StageContext, frames, forward, occluded, backend: str) -> None:  # noqa: ANN001
    """Up to eight pairs: the first frame, its forward flow colour-coded (hue: direction, saturation: speed), and
    its occluded pixels in white, for the UI."""
    shown = spread(forward.shape[0], SHOWN_PAIRS)
    flows = torch.from_numpy(np.asarray(forward.oindex[shown], np.float32))
    colours = flow_to_image(flows).permute(0, 2, 3, 1).numpy()  # saturation relative to the fastest pixel shown
    fastest = float(flows.square().sum(dim=1).sqrt().max())
    mask = np.repeat(np.asarray(occluded.oindex[shown], np.uint8)[..., None] * 255, 3, axis=-1)
    labels = [f"{label} -> next" for label in frame_labels(ctx.store, ctx.input("frames"), shown)]
    picture = ctx.picture("flow", contact_sheet(np.asarray(frames.oindex[shown]), [colours, mask], labels=labels))
    ctx.publish(f"**optical flow** ({backend}), frame to next: frame, flow (hue: direction; saturation: speed, full at "
                f"the fastest pixel shown, {fastest:.3g} px a frame), occluded (white)\n\n{picture}")  # fmt: skip


@stage_check("estimate_flow", "raft")
def _raft_model(ctx: PreflightContext) -> None:
    """Refuses, before any model loads, a torchvision model that is not RAFT, and a clip of one frame."""
    architecture = (ctx.model_config("flow") or {}).get("architecture", "raft_large")
    if architecture not in RAFT_ARCHITECTURES:
        raise ValueError(f"the flow role needs a RAFT ({', '.join(RAFT_ARCHITECTURES)}); this model's config.json names "
                         f"{architecture!r}")  # fmt: skip
    _two_frames(ctx)


@stage_check("estimate_flow", "farneback")
def _two_frames(ctx: PreflightContext) -> None:
    """Refuses, before any model loads, a clip of one frame: there is no pair to flow between."""
    preview = ctx.input("frames")
    if preview is not None and preview.count < 2:
        raise ValueError(f"optical flow needs at least 2 frames; the clip has {preview.count}: take more frames "
                         "(decode_video num_frames)")  # fmt: skip
