"""embed_audio: one audio embedding per frame, from the `audio` source or the clip's own track, by the encoder family
of the `audio_encoder` role (soundclip: log-mel windows; transformers: a Perception Encoder's waveform windows)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from reelflow.core.audio.spectrogram import (
    HOP,
    N_MELS,
    SAMPLE_RATE,
    FrameWindows,
    columns_of,
    frame_windows,
    log_mel,
    to_mono,
    window_inputs,
)
from reelflow.core.video import AudioTrack, decode_audio_file
from reelflow.schemas.audio import AudioEmbeddings, EmbedAudioParams
from reelflow.schemas.calls import StageCall
from reelflow.schemas.errors import SourceError
from reelflow.schemas.kinds import VideoFrames
from reelflow.schemas.refs import ArtifactRef
from reelflow.tasks.frames import frame_times
from reelflow.tasks.preflight import PreflightContext, stage_check
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

MAX_PICTURE_COLUMNS = 2048
NO_SOUND = ("the clip has no sound track and the pipeline gives no sound file: declare an `audio` source "
            "(`--source audio=PATH`, or a sidecar such as '{stem}.wav')")  # fmt: skip


@dataclass(frozen=True)
class Encoding:
    """How a backend embeds: each frame's ``windows`` on the track's clock, ``embed(indices) -> (n, D)`` for a batch
    of them, and its name for the attrs."""

    windows: FrameWindows
    embed: Callable[[range], np.ndarray]
    backend: str


@stage_task("embed_audio")
def embed_audio(call: StageCall) -> ArtifactRef:
    """``embeddings (F, D)`` (float32), each frame's window ``span (F, 2)`` and time ``frame_time (F,)`` on the video's
    clock (seconds), and the sound's log-mel ``spectrogram (mel, column)`` in [0, 1] (float16)."""
    return run_stage(call, _embed)


def _embed(ctx: StageContext) -> AudioEmbeddings:
    p: EmbedAudioParams = ctx.call.stage.params
    decoded = ctx.input("frames")
    video = VideoFrames.read(decoded.attrs.asdict())
    track, origin, sound = _sound(ctx, decoded, video, p)
    mel = log_mel(to_mono(track.samples, track.sample_rate))
    times = frame_times(ctx.store, decoded)
    backend = BACKENDS[ctx.call.models["audio_encoder"].family]
    encoding = backend(ctx, track, mel, times - origin, 1.0 / float(Fraction(video.fps)))
    count = len(times)
    out = None
    ctx.progress.start(count, unit="frames")
    for start in range(0, count, p.batch_size):
        indices = range(start, min(start + p.batch_size, count))
        embedded = encoding.embed(indices)
        if out is None:
            out = ctx.writer.create_array("embeddings", shape=(count, embedded.shape[1]), dtype=np.float32, dims=("frame", "embedding"))
        out[indices.start : indices.stop] = embedded
        ctx.progress.advance(len(indices))
    span = encoding.windows.seconds()
    ctx.writer.write_array("span", span + origin, dims=("frame", "bound"), dtype=np.float64)
    ctx.writer.write_array("frame_time", times, dims=("frame",), dtype=np.float64)
    ctx.writer.write_array("spectrogram", mel, dims=("mel", "column"), dtype=np.float16)
    _publish(ctx, mel, columns_of(span[:, 0]), sound)
    return AudioEmbeddings(sound=sound, sample_rate=SAMPLE_RATE, hop_length=HOP, n_mels=N_MELS, window_seconds=p.window_seconds,
                           offset=origin, backend=encoding.backend, embedding_dim=int(out.shape[1]))  # fmt: skip


def _soundclip(ctx: StageContext, track: AudioTrack, mel: np.ndarray, starts: np.ndarray, frame_seconds: float) -> Encoding:
    """Log-mel windows of the spectrogram through a CLIP-aligned audio encoder (methods.md 5.3)."""
    windows = frame_windows(starts, frame_seconds, ctx.call.stage.params.window_seconds, mel.shape[1])
    encoder = ctx.model("audio_encoder")
    return Encoding(windows, lambda indices: encoder.embed(window_inputs(mel, windows, indices)).numpy(),
                    f"soundclip:{encoder.architecture}")  # fmt: skip


def _perception(ctx: StageContext, track: AudioTrack, mel: np.ndarray, starts: np.ndarray, frame_seconds: float) -> Encoding:
    """Waveform windows at the feature extractor's rate through a Perception Encoder's audio tower
    (:mod:`reelflow.core.audio.perception`)."""
    from reelflow.core.audio.perception import audio_embeddings, audio_tower, sample_windows

    model, extractor = ctx.model("audio_encoder"), ctx.model("audio_encoder", component="feature_extractor")
    rate = int(extractor.sampling_rate)
    waveform = to_mono(track.samples, track.sample_rate, rate)
    windows = sample_windows(starts, frame_seconds, ctx.call.stage.params.window_seconds, len(waveform), rate)
    ctx.record(encoder_sample_rate=rate, encoder=ctx.call.models["audio_encoder"].fingerprint)  # for the image side's check
    return Encoding(windows.cut(), lambda indices: audio_embeddings(model, extractor, windows.waveforms(waveform, indices),
                                                                    rate).numpy(),
                    f"transformers:{type(audio_tower(model)).__name__}")  # fmt: skip


Backend = Callable[[StageContext, AudioTrack, np.ndarray, np.ndarray, float], Encoding]
BACKENDS: dict[str, Backend] = {"soundclip": _soundclip, "transformers": _perception}  # by the audio_encoder's family


def _sound(ctx: StageContext, decoded, video: VideoFrames, p: EmbedAudioParams) -> tuple[AudioTrack, float, str]:  # noqa: ANN001
    """The sound, where its first sample falls on the video's clock, and which sound it is."""
    if "audio" in ctx.call.sources:
        with ctx.open_source("audio") as handle:
            track = decode_audio_file(handle)
        if track is None or track.samples.shape[1] == 0:
            raise SourceError("the `audio` source holds no sound; give a file with an audio stream")
        return track, p.offset, "source"
    if "audio" not in decoded or video.sample_rate is None:
        raise SourceError(NO_SOUND)
    return AudioTrack(samples=np.asarray(decoded["audio"][:], np.float32), sample_rate=video.sample_rate), video.start, "video"


def _publish(ctx: StageContext, mel: np.ndarray, window_starts: np.ndarray, sound: str) -> None:
    """The spectrogram (low frequencies at the bottom) with a line where each frame's window starts (``window_starts``,
    spectrogram columns), for the UI."""
    import io

    from PIL import Image

    step = -(-mel.shape[1] // MAX_PICTURE_COLUMNS)  # a long track is shown every step-th column
    picture = (np.flipud(mel[:, ::step]) * 255).astype(np.uint8)
    rgb = np.repeat(picture[..., None], 3, axis=-1)
    for column in np.unique(window_starts // step):
        rgb[:, min(int(column), rgb.shape[1] - 1)] = (220, 60, 40)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    shown = ctx.picture("spectrogram", buffer.getvalue())
    said = "the `audio` source" if sound == "source" else "the clip's own track"
    ctx.publish(f"**log-mel spectrogram** of {said} "
                     f"({N_MELS} mel bands, {HOP / SAMPLE_RATE * 1000:.1f} ms per column); red: where each frame's window "
                     f"starts\n\n{shown}")  # fmt: skip


@stage_check("embed_audio")
def _check_sound(ctx: PreflightContext) -> None:
    """Refuses, before any model loads, a transformers model without a Perception Encoder audio tower, and a clip
    with no sound track when no sound file is given."""
    _check_encoder(ctx)
    if ctx.has_source("audio"):
        ctx.source("audio")  # probed: an audio stream must be there
        return
    preview = ctx.input("frames")
    if preview is not None and preview.has_audio is False:
        raise ValueError(NO_SOUND)


def _check_encoder(ctx: PreflightContext) -> None:
    from reelflow.core.audio.perception import AUDIO_TOWERS

    if ctx.model_family("audio_encoder") != "transformers":
        return
    kind = (ctx.model_config("audio_encoder") or {}).get("model_type")
    if kind not in AUDIO_TOWERS:
        raise ValueError(f"the audio_encoder is a transformers model of type {kind!r}, which has no Perception Encoder "
                         f"audio tower; give a facebook/pe-av-* model (model types: {', '.join(AUDIO_TOWERS)})")  # fmt: skip
