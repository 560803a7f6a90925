"""decode_video and encode_video: the pipeline's way in and out."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import zarr

from reelflow.core.frames import ResizePlan, plan_resize, resize_frames
from reelflow.core.video import (
    AudioTrack,
    FrameSelection,
    SelectedFrames,
    VideoInfo,
    decode_audio,
    decode_frames,
    encode_mp4,
    probe_video,
    select_frames,
)
from reelflow.schemas.calls import StageCall
from reelflow.schemas.kinds import EncodedVideo, Resize, SourceVideo, VideoFrames
from reelflow.schemas.refs import ArtifactRef
from reelflow.schemas.stages import DecodeVideoParams
from reelflow.tasks.preflight import FramesPreview, PreflightContext, stage_check
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

MP4_CHUNK_BYTES = 1 << 20
AUDIO_CHUNK_SAMPLES = 1 << 18  # about 5 s at 48 kHz per chunk, chunked along time


@stage_task("decode_video")
def decode_video(call: StageCall) -> ArtifactRef:
    """Selected frames as uint8 ``(F, H, W, 3)``, their source indices, and the audio of their span."""
    return run_stage(call, _decode)


def _decode(ctx: StageContext) -> VideoFrames:
    p = ctx.call.stage.params
    with ctx.open_source("video") as handle:
        info = probe_video(handle)
        span, plan = _plan_decode(info, p)
        frames = decode_frames(handle, span.indices)
        audio = decode_audio(handle, span.start, span.end)
    ctx.writer.write_array("frames", resize_frames(frames, plan), dims=("frame", "y", "x", "rgb"))
    ctx.writer.write_array("frame_index", np.asarray(span.indices, dtype=np.int64), dims=("frame",))
    if audio is not None:
        channels, samples = audio.samples.shape
        chunks = (channels, max(1, min(samples, AUDIO_CHUNK_SAMPLES)))
        dims = ("audio_channel", "sample")  # not "channel": frames and audio open as one xarray Dataset
        ctx.writer.write_array("audio", audio.samples, dims=dims, dtype=np.float32, chunks=chunks)
    return VideoFrames(
        fps=f"{span.fps.numerator}/{span.fps.denominator}",
        start=span.start,
        end=span.end,
        sample_rate=audio.sample_rate if audio is not None else None,
        source_video=SourceVideo(
            width=info.width,
            height=info.height,
            fps=f"{info.fps.numerator}/{info.fps.denominator}",
            num_frames=info.num_frames,
            duration=info.duration,
            codec=info.codec,
        ),
        resize=Resize(scaled=(plan.scaled_w, plan.scaled_h), output=(plan.out_w, plan.out_h), fit=p.fit),
    )


def _plan_decode(info: VideoInfo, p: DecodeVideoParams) -> tuple[SelectedFrames, ResizePlan]:
    """Which source frames decode_video takes and how it sizes them: one path for the body and its check."""
    span = select_frames(info, FrameSelection(start=p.start, num_frames=p.num_frames, stride=p.stride, fps=p.fps))
    plan = plan_resize(info.width, info.height, width=p.width, height=p.height, fit=p.fit, multiple=p.multiple)
    return span, plan


@stage_check("decode_video")
def check_decode_video(ctx: PreflightContext) -> FramesPreview:
    """The frames decode_video will write, from the source's headers alone."""
    p, source = ctx.spec.params, ctx.source("video")
    span, plan = _plan_decode(source.video, p)
    ctx.logger.info("%s: %d of %d frames, %dx%d -> %dx%d (%s)", ctx.stage_id, len(span.indices), source.num_frames,
                    source.width, source.height, plan.out_w, plan.out_h, p.fit)  # fmt: skip
    return FramesPreview(count=len(span.indices), height=plan.out_h, width=plan.out_w, source_width=source.width,
                         source_height=source.height, fit=p.fit, has_audio=source.video.has_audio,
                         source_frames=source.num_frames)  # fmt: skip


@stage_task("encode_video")
def encode_video(call: StageCall) -> ArtifactRef:
    """An H.264/H.265 MP4 of the frames at the source's frame rate, with the source audio; stored as bytes."""
    return run_stage(call, _encode)


def _encode(ctx: StageContext) -> EncodedVideo:
    p = ctx.call.stage.params
    frames, source = ctx.array("frames", "frames"), ctx.attrs("source")
    fps = Fraction(source.fps)
    audio = _source_audio(ctx.input("source"), source) if p.audio else None
    buffer = io.BytesIO()
    encode_mp4(buffer, frames, fps, audio, crf=p.crf, codec=p.codec, preset=p.preset)
    data = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    array = ctx.writer.create_array("mp4", shape=data.shape, dtype=np.uint8, dims=("byte",), chunks=(MP4_CHUNK_BYTES,))
    array[:] = data
    return EncodedVideo(
        fps=source.fps,
        num_frames=int(frames.shape[0]),
        duration=frames.shape[0] / float(fps),
        width=int(frames.shape[2]),
        height=int(frames.shape[1]),
        has_audio=audio is not None,
    )


def _source_audio(group: zarr.Group, source: VideoFrames) -> AudioTrack | None:
    if "audio" not in group or source.sample_rate is None:
        return None
    return AudioTrack(samples=np.asarray(group["audio"][:], dtype=np.float32), sample_rate=source.sample_rate)
