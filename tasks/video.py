"""decode_video and encode_video: the pipeline's way in and out."""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Any

import fsspec
import numpy as np
import zarr

from reelflow.core.frames import plan_resize, resize_frames
from reelflow.core.video import AudioTrack, FrameSelection, decode_audio, decode_frames, encode_mp4, probe_video, select_frames
from reelflow.schemas.calls import StageCall
from reelflow.schemas.refs import ArtifactRef
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

MP4_CHUNK_BYTES = 1 << 20
AUDIO_CHUNK_SAMPLES = 1 << 18  # about 5 s at 48 kHz per chunk, chunked along time


@stage_task("decode_video")
def decode_video(call: StageCall) -> ArtifactRef:
    """Selected frames as uint8 ``(F, H, W, 3)``, their source indices, and the audio of their span."""
    return run_stage(call, _decode)


def _decode(ctx: StageContext) -> dict[str, Any]:
    p, source = ctx.call.stage.params, ctx.call.source
    with fsspec.open(source.url, "rb", **source.storage_options) as handle:
        info = probe_video(handle)
        span = select_frames(info, FrameSelection(start=p.start, num_frames=p.num_frames, stride=p.stride, fps=p.fps))
        frames = decode_frames(handle, span.indices)
        audio = decode_audio(handle, span.start, span.end)
    plan = plan_resize(info.width, info.height, width=p.width, height=p.height, fit=p.fit, multiple=p.multiple)
    ctx.writer.write_array("frames", resize_frames(frames, plan), dims=("frame", "y", "x", "channel"))
    ctx.writer.write_array("frame_index", np.asarray(span.indices, dtype=np.int64), dims=("frame",))
    if audio is not None:
        channels, samples = audio.samples.shape
        chunks = (channels, max(1, min(samples, AUDIO_CHUNK_SAMPLES)))
        ctx.writer.write_array("audio", audio.samples, dims=("channel", "sample"), dtype=np.float32, chunks=chunks)
    return {
        "fps": f"{span.fps.numerator}/{span.fps.denominator}",
        "start": span.start,
        "end": span.end,
        "sample_rate": audio.sample_rate if audio is not None else None,
        "source_video": {
            "width": info.width,
            "height": info.height,
            "fps": f"{info.fps.numerator}/{info.fps.denominator}",
            "num_frames": info.num_frames,
            "duration": info.duration,
            "codec": info.codec,
        },
        "resize": {"scaled": [plan.scaled_w, plan.scaled_h], "output": [plan.out_w, plan.out_h], "fit": p.fit},
    }


@stage_task("encode_video")
def encode_video(call: StageCall) -> ArtifactRef:
    """An H.264/H.265 MP4 of the frames at the source's frame rate, with the source audio; stored as bytes."""
    return run_stage(call, _encode)


def _encode(ctx: StageContext) -> dict[str, Any]:
    p = ctx.call.stage.params
    frames_group, source = ctx.input("frames"), ctx.input("source")
    frames = np.asarray(frames_group["frames"][:])
    fps = Fraction(source.attrs["fps"])
    audio = _source_audio(source) if p.audio else None
    buffer = io.BytesIO()
    encode_mp4(buffer, frames, fps, audio, crf=p.crf, codec=p.codec, preset=p.preset)
    data = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    array = ctx.writer.create_array("mp4", shape=data.shape, dtype=np.uint8, dims=("byte",), chunks=(MP4_CHUNK_BYTES,))
    array[:] = data
    return {
        "fps": source.attrs["fps"],
        "num_frames": int(frames.shape[0]),
        "duration": frames.shape[0] / float(fps),
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
        "has_audio": audio is not None,
        "media_type": "video/mp4",
    }


def _source_audio(source: zarr.Group) -> AudioTrack | None:
    if "audio" not in source:
        return None
    return AudioTrack(samples=np.asarray(source["audio"][:], dtype=np.float32), sample_rate=int(source.attrs["sample_rate"]))
