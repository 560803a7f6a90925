"""decode_mask: the mask source as one binary mask per frame at the frames' size."""

from __future__ import annotations

import numpy as np

from reelflow.core.frames import centred_plan
from reelflow.core.masks import MaskLayout, binarise, check_size, pick_masks, probe_masks, read_masks, resize_masks
from reelflow.schemas.calls import StageCall
from reelflow.schemas.kinds import VideoFrames
from reelflow.schemas.masks import DecodeMaskParams, MaskFrames
from reelflow.schemas.refs import ArtifactRef
from reelflow.storage.files import url_to_fs
from reelflow.tasks.artifacts import contact_sheet, spread
from reelflow.tasks.preflight import FramesPreview, PreflightContext, stage_check
from reelflow.tasks.frames import frame_labels
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

CHUNK = 16
SHOWN_FRAMES = 8


@stage_task("decode_mask")
def decode_mask(call: StageCall) -> ArtifactRef:
    """``mask (F, H, W)`` (bool, True: the region to edit) and each mask's ``coverage (F,)`` (fraction inside)."""
    return run_stage(call, _decode)


def _decode(ctx: StageContext) -> MaskFrames:
    p: DecodeMaskParams = ctx.call.stage.params
    decoded = ctx.input("frames")
    video = VideoFrames.read(decoded.attrs.asdict())
    ref = ctx.call.sources["mask"]
    fs, path = url_to_fs(ref.url, ref.storage_options)
    layout = probe_masks(fs, path)
    picks = pick_masks(layout, decoded["frame_index"][:].tolist(), video.source_video.num_frames)
    source = (video.source_video.width, video.source_video.height)
    resized = check_size(layout, source, tuple(video.resize.output))
    plan = centred_plan(*video.resize.scaled, *video.resize.output) if resized else None
    count, (width, height) = len(picks), video.resize.output
    out = ctx.writer.create_array("mask", shape=(count, height, width), dtype=bool, dims=("frame", "y", "x"),
                                  chunks=(min(count, CHUNK), height, width))  # fmt: skip
    for start in range(0, count, CHUNK):
        wanted = picks[start : start + CHUNK]
        unique = sorted(set(wanted))
        masks = binarise(read_masks(fs, path, layout, unique), p.threshold, f"mask source {ref.url!r}")
        sized = resize_masks(masks.astype(np.float32), plan) >= 0.5  # binary before and after: resizing blurs edges only
        out[start : start + len(wanted)] = sized[[unique.index(i) for i in wanted]]
    coverage = np.asarray([float(np.asarray(out[i]).mean()) for i in range(count)])
    ctx.writer.write_array("coverage", coverage, dims=("frame",), dtype=np.float32)
    _publish(ctx, decoded["frames"], out, layout)
    return MaskFrames(form=layout.form, count=layout.count, threshold=p.threshold, source_size=(layout.width, layout.height),
                      resized=resized)  # fmt: skip


def _publish(ctx: StageContext, frames, masks, layout: MaskLayout) -> None:  # noqa: ANN001
    """Up to eight frames above their mask (white: edited), for the UI."""
    shown = spread(masks.shape[0], SHOWN_FRAMES)
    labels = frame_labels(ctx.store, ctx.input("frames"), shown)
    picture = ctx.picture("mask", contact_sheet(np.asarray(frames.oindex[shown]), [np.asarray(masks.oindex[shown], np.float32)],
                                                labels=labels))  # fmt: skip
    ctx.publish(f"**region mask** per frame (white: "
                     f"edited), from a mask {layout.form}\n\n{picture}")  # fmt: skip


@stage_check("decode_mask")
def _check_masks(ctx: PreflightContext) -> FramesPreview | None:
    """Refuses, before any model loads, masks of the wrong count or size, and images that are not black and white."""
    preview = ctx.input("frames")
    fs, path = ctx.source_location("mask")
    layout = probe_masks(fs, path)
    if preview is None:
        return None
    if preview.source_frames is not None or layout.count in (1, preview.count):
        pick_masks(layout, range(preview.count), preview.source_frames or -1)  # raises, naming the counts that fit
    check_size(layout, (preview.source_width, preview.source_height), (preview.width, preview.height))
    if layout.form != "video":  # images are cheap to read whole; a video's masks are checked as they are decoded
        binarise(read_masks(fs, path, layout, range(layout.count)), ctx.spec.params.threshold, f"mask source {path!r}")
    return None
