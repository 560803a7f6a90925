"""embed_audio: one CLIP-aligned audio embedding per frame, from the `audio` source or the clip's own track."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from reelflow.core.audio.spectrogram import HOP, N_MELS, SAMPLE_RATE, frame_windows, log_mel, to_mono, window_inputs
from reelflow.core.video import AudioTrack, decode_audio_file
from reelflow.schemas.audio import AudioEmbeddings, EmbedAudioParams
from reelflow.schemas.calls import StageCall
from reelflow.schemas.errors import SourceError
from reelflow.schemas.kinds import VideoFrames
from reelflow.schemas.refs import ArtifactRef
from reelflow.tasks.artifacts import publish_markdown
from reelflow.tasks.depth import frame_times
from reelflow.tasks.preflight import PreflightContext, stage_check
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

MAX_PICTURE_COLUMNS = 2048
NO_SOUND = ("the clip has no sound track and the pipeline gives no sound file: declare an `audio` source "
            "(`--source audio=PATH`, or a sidecar such as '{stem}.wav')")  # fmt: skip


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
    windows = frame_windows(times - origin, 1.0 / float(Fraction(video.fps)), p.window_seconds, mel.shape[1])
    encoder = ctx.model("audio_encoder")
    count = len(times)
    out = None
    ctx.progress.start(count)
    for start in range(0, count, p.batch_size):
        indices = range(start, min(start + p.batch_size, count))
        embedded = encoder.embed(window_inputs(mel, windows, indices)).numpy()
        if out is None:
            out = ctx.writer.create_array("embeddings", shape=(count, embedded.shape[1]), dtype=np.float32, dims=("frame", "embedding"))
        out[indices.start : indices.stop] = embedded
        ctx.progress.advance(len(indices))
    ctx.writer.write_array("span", windows.seconds() + origin, dims=("frame", "bound"), dtype=np.float64)
    ctx.writer.write_array("frame_time", times, dims=("frame",), dtype=np.float64)
    ctx.writer.write_array("spectrogram", mel, dims=("mel", "column"), dtype=np.float16)
    _publish(ctx, mel, windows.start, sound)
    return AudioEmbeddings(sound=sound, sample_rate=SAMPLE_RATE, hop_length=HOP, n_mels=N_MELS, window_seconds=p.window_seconds,
                           offset=origin, backend=f"soundclip:{encoder.architecture}", embedding_dim=int(out.shape[1]))  # fmt: skip


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
    """The spectrogram (low frequencies at the bottom) with a line where each frame's window starts, for the UI."""
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
    publish_markdown(f"{ctx.call.stage_id}-{ctx.call.key[:8]}", f"### `{ctx.call.stage_id}`: log-mel spectrogram of {said} "
                     f"({N_MELS} mel bands, {HOP / SAMPLE_RATE * 1000:.1f} ms per column); red: where each frame's window "
                     f"starts\n\n{shown}", description="sound per frame")  # fmt: skip


@stage_check("embed_audio")
def _check_sound(ctx: PreflightContext) -> None:
    """Refuses, before any model loads, a clip with no sound track when no sound file is given."""
    if ctx.has_source("audio"):
        ctx.source("audio")  # probed: an audio stream must be there
        return
    preview = ctx.input("frames")
    if preview is not None and preview.has_audio is False:
        raise ValueError(NO_SOUND)
