"""Video and audio I/O with PyAV: probe a source, select frames, decode them, encode MP4.

A source is a path or an open binary file object (an fsspec file), so this module never learns
which storage backend holds the video. Every problem with the input raises
:class:`~schemas.errors.InputVideoError` naming the problem, the source and the fix, before any
model work starts.

Frame indices count decoded frames in presentation order from the first frame, which is exact for
constant-frame-rate files (what cameras and editors export). Times are seconds from the first
video frame; audio is placed on the same clock.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, TypeAlias

import av
import numpy as np

from reelflow.schemas.errors import InputVideoError

VideoSource: TypeAlias = "str | os.PathLike[str] | BinaryIO"
VideoTarget: TypeAlias = "str | os.PathLike[str] | BinaryIO"

_AUDIO_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1"}
_AUDIO_SLACK_SECONDS = 0.05  # codec priming/padding; far less than any real truncation
_FIX_UNREADABLE = "re-export or re-download it (MP4/MOV/MKV/WebM with H.264, H.265, VP9 or AV1)"


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns from a container's headers, without decoding."""

    width: int
    height: int
    fps: Fraction
    num_frames: int
    """Frame count from the header, else ``round(duration * fps)``."""
    duration: float
    has_audio: bool
    audio_sample_rate: int | None
    audio_channels: int | None
    codec: str
    audio_duration: float | None = None
    """Seconds of audio per the header; ``None`` without audio or when the header omits it."""


@dataclass(frozen=True)
class FrameSelection:
    """Which source frames an edit uses: a start time, a count, and a stride or a target fps."""

    start: float = 0.0
    num_frames: int | None = None
    stride: int | None = None
    fps: float | None = None

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"start {self.start} is negative; use a time in seconds >= 0")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames {self.num_frames} must be >= 1, or None for all")
        if self.stride is not None and self.fps is not None:
            raise ValueError(f"give stride ({self.stride}) or fps ({self.fps}), not both")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride {self.stride} must be >= 1")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps {self.fps} must be > 0")


@dataclass(frozen=True)
class SelectedFrames:
    """Source frame indices to decode and the time span they cover, for trimming the audio."""

    indices: tuple[int, ...]
    fps: Fraction
    start: float
    end: float


@dataclass(frozen=True)
class AudioTrack:
    """Audio samples (``np.ndarray`` float32 of shape ``(channels, n)``, in [-1, 1])."""

    samples: np.ndarray
    sample_rate: int

    def __post_init__(self) -> None:
        if self.samples.ndim != 2 or self.samples.dtype != np.float32:
            raise ValueError(
                f"audio samples must be float32 of shape (channels, n), "
                f"got {self.samples.dtype} {self.samples.shape}"
            )

    @property
    def duration(self) -> float:
        return self.samples.shape[1] / self.sample_rate


# --- opening sources ---------------------------------------------------------------------------


def _is_path(source: VideoSource) -> bool:
    return isinstance(source, (str, os.PathLike))


def _name(source: VideoSource) -> str:
    if _is_path(source):
        return os.fspath(source)
    path, fs = getattr(source, "path", None), getattr(source, "fs", None)
    if path and hasattr(fs, "unstrip_protocol"):
        return fs.unstrip_protocol(path)  # an fsspec file: its URL, protocol included
    return str(path or getattr(source, "name", None) or repr(source))


def _check_not_empty(source: VideoSource) -> None:
    name = _name(source)
    if _is_path(source):
        if not os.path.isfile(source):
            raise InputVideoError(f"video file not found: {name!r}; check the path or URL")
        empty = os.path.getsize(source) == 0
    else:
        source.seek(0)
        empty = not source.read(1)
        source.seek(0)
    if empty:
        raise InputVideoError(f"video file is empty (0 bytes): {name!r}; {_FIX_UNREADABLE}")


@contextlib.contextmanager
def _open_input(source: VideoSource) -> Iterator[av.container.InputContainer]:
    """Open ``source`` for reading; a file object is rewound before and after."""
    _check_not_empty(source)
    try:
        container = av.open(os.fspath(source) if _is_path(source) else source, mode="r")
    except av.error.FFmpegError as err:
        # An MP4 keeps its index (moov) at the end unless written faststart, so a cut-off
        # download fails here, just like a file that is not media at all.
        raise InputVideoError(
            f"cannot read {_name(source)!r} as a video ({err.strerror}): it is not a media file, "
            f"or it is truncated or corrupt; {_FIX_UNREADABLE}"
        ) from err
    try:
        yield container
    finally:
        container.close()
        if not _is_path(source):
            source.seek(0)


def _video_stream(container: av.container.InputContainer, source: VideoSource) -> av.VideoStream:
    for stream in container.streams.video:
        # Cover art in audio files shows up as a one-picture video stream.
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    kinds = ", ".join(f"{s.type} ({s.codec_context.name})" for s in container.streams) or "none"
    raise InputVideoError(
        f"{_name(source)!r} has no video stream (streams: {kinds}); "
        f"pass a video file, not an audio-only or subtitle file"
    )


def _frame_rate(stream: av.VideoStream, source: VideoSource) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise InputVideoError(
            f"{_name(source)!r} does not declare a frame rate; "
            f"remux it with a constant frame rate (e.g. ffmpeg -i IN -r 24 OUT.mp4)"
        )
    return Fraction(rate)


def _stream_seconds(stream: av.stream.Stream) -> float | None:
    if stream.duration is None or stream.time_base is None:
        return None
    return float(stream.duration * stream.time_base)


def _duration(
    container: av.container.InputContainer, stream: av.VideoStream, source: VideoSource
) -> float:
    seconds = _stream_seconds(stream)
    if seconds is None and container.duration is not None:
        seconds = container.duration / av.time_base
    if seconds is None and stream.frames > 0:
        seconds = stream.frames / _frame_rate(stream, source)
    if not seconds:
        raise InputVideoError(
            f"{_name(source)!r} does not declare its duration or frame count; "
            f"remux it (e.g. ffmpeg -i IN -c copy OUT.mp4)"
        )
    return float(seconds)


# --- probing and selection ---------------------------------------------------------------------


def probe_video(source: VideoSource) -> VideoInfo:
    """Read the headers of ``source`` (a path or a binary file object) into a :class:`VideoInfo`."""
    with _open_input(source) as container:
        stream = _video_stream(container, source)
        fps = _frame_rate(stream, source)
        duration = _duration(container, stream, source)
        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=fps,
            num_frames=stream.frames if stream.frames > 0 else round(duration * fps),
            duration=duration,
            has_audio=audio is not None,
            audio_sample_rate=audio.codec_context.sample_rate if audio else None,
            audio_channels=audio.codec_context.channels if audio else None,
            codec=stream.codec_context.name,
            audio_duration=_stream_seconds(audio) if audio else None,
        )


def select_frames(info: VideoInfo, selection: FrameSelection) -> SelectedFrames:
    """Turn a time-based :class:`FrameSelection` into source frame indices.

    ``end`` is where the last selected frame stops showing, ``min(last + stride, num_frames)``
    source frames in, so ``end - start`` equals ``len(indices) / fps`` except where the video ends
    first: the span's audio then lines up with the re-timed frames.
    """
    src_fps = info.fps
    stride = selection.stride or 1
    if selection.fps is not None:
        stride = max(1, round(src_fps / Fraction(selection.fps)))
    # The tolerance keeps a start like 1.16 s at 25 fps on frame 29, not 28.999... -> 28.
    first = math.floor(selection.start * src_fps + 1e-6)
    indices = range(first, info.num_frames, stride)[: selection.num_frames]
    if not indices:
        raise InputVideoError(
            f"start {selection.start}s is at or past the end of the video "
            f"({info.duration:.3f}s, {info.num_frames} frames); choose a start below "
            f"{info.duration:.3f}s"
        )
    end = min(indices[-1] + stride, info.num_frames)
    return SelectedFrames(
        indices=tuple(indices),
        fps=src_fps / stride,
        start=float(first / src_fps),
        end=float(end / src_fps),
    )


# --- decoding ----------------------------------------------------------------------------------


def _truncated(source: VideoSource, what: str, expected: int, decoded: int) -> InputVideoError:
    return InputVideoError(
        f"{_name(source)!r} is truncated or corrupt: expected {expected} {what}, decoded "
        f"{decoded}; {_FIX_UNREADABLE}"
    )


def _indexed_frames(
    container: av.container.InputContainer, stream: av.VideoStream, fps: Fraction, first: int
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield ``(index, frame)`` in presentation order, starting at or before frame ``first``.

    Seeks to the keyframe before ``first``, anchors the count on that frame's timestamp, and
    counts from there. A demuxer whose index holds decode times can land on a keyframe shown
    after ``first``; then it decodes from the start instead.
    """
    origin = stream.start_time or 0
    for target in (first, 0) if first > 0 else (0,):
        container.seek(origin + int(target / fps / stream.time_base), stream=stream)
        frames = container.decode(stream)
        head = next(frames, None)
        if head is None:
            return
        index = 0 if target == 0 or head.pts is None else _pts_index(head, origin, stream, fps)
        if index <= first:
            break
    yield index, head
    for index, frame in enumerate(frames, start=index + 1):
        yield index, frame


def _pts_index(frame: av.VideoFrame, origin: int, stream: av.VideoStream, fps: Fraction) -> int:
    return round((frame.pts - origin) * stream.time_base * fps)


def decode_frames(source: VideoSource, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at ``indices`` of ``source``.

    Returns ``np.ndarray`` uint8 of shape ``(len(indices), H, W, 3)``, RGB, in the order of
    ``indices`` (which may repeat or be unsorted). Decoding stops after the last wanted frame.
    """
    if len(indices) == 0 or min(indices) < 0:
        raise ValueError(f"indices must be a non-empty sequence of ints >= 0, got {indices!r}")
    wanted = set(indices)
    last = max(wanted)
    found: dict[int, np.ndarray] = {}
    with _open_input(source) as container:
        stream = _video_stream(container, source)
        stream.thread_type = "AUTO"
        fps = _frame_rate(stream, source)
        try:
            for index, frame in _indexed_frames(container, stream, fps, min(wanted)):
                if index in wanted:
                    found[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
        except av.error.FFmpegError as err:
            raise _truncated(source, "frames", len(wanted), len(found)) from err
    if len(found) < len(wanted):
        raise _truncated(source, "frames", len(wanted), len(found))
    return np.stack([found[i] for i in indices])


def _audio_chunks(
    container: av.container.InputContainer, stream: av.AudioStream, origin: float
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_sample, samples)`` as float32 ``(channels, n)`` on the video's clock."""
    rate = stream.codec_context.sample_rate
    resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
    position = None
    # The trailing None flushes the resampler.
    for frame in itertools.chain(container.decode(stream), [None]):
        if position is None and frame is not None and frame.pts is not None:
            position = round((float(frame.pts * stream.time_base) - origin) * rate)
        for out in resampler.resample(frame):
            chunk = out.to_ndarray().astype(np.float32, copy=False)
            yield position or 0, chunk
            position = (position or 0) + chunk.shape[1]


def _audio_end(stream: av.AudioStream, origin: float, rate: int) -> int | float:
    """The track's last sample on the video's clock, per the header; ``inf`` if not declared.

    AAC decoders emit the encoder's padding after the last real sample; the header's duration
    says where the track really ends.
    """
    seconds = _stream_seconds(stream)
    if seconds is None:
        return math.inf
    begin = float((stream.start_time or 0) * stream.time_base)
    return round((begin + seconds - origin) * rate)


def decode_audio(source: VideoSource, start: float, end: float) -> AudioTrack | None:
    """Decode the first audio stream of ``source`` over ``[start, end)`` seconds.

    Times are on the video's clock (0 = first video frame). Returns samples of shape
    ``(channels, round(end * rate) - round(start * rate))``: where the track (as long as its header
    says) is shorter than the span, the rest is silence. ``None`` when ``source`` has no audio stream.
    """
    if not 0 <= start < end:
        raise ValueError(f"audio span [{start}, {end}) must satisfy 0 <= start < end")
    with _open_input(source) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        videos = [s for s in container.streams.video if s.start_time is not None]
        origin = float(videos[0].start_time * videos[0].time_base) if videos else 0.0
        lo, hi = round(start * rate), round(end * rate)
        stop = min(hi, _audio_end(stream, origin, rate))
        out = np.zeros((stream.codec_context.channels, hi - lo), np.float32)
        decoded, reached = 0, -math.inf
        try:
            for position, chunk in _audio_chunks(container, stream, origin):
                a, b = max(position, lo), min(position + chunk.shape[1], stop)
                if a < b:
                    out[:, a - lo : b - lo] = chunk[:, a - position : b - position]
                decoded += chunk.shape[1]
                reached = position + chunk.shape[1]
                if reached >= hi:
                    break
        except av.error.FFmpegError as err:
            raise _truncated(source, "audio samples", hi - lo, decoded) from err
    # A track that ends cleanly before the length its header declares was cut short.
    if math.isfinite(stop) and reached < min(hi, stop) - _AUDIO_SLACK_SECONDS * rate:
        raise _truncated(source, "audio samples", hi - lo, max(0, int(reached) - lo))
    return AudioTrack(samples=out, sample_rate=rate)


def decode_audio_file(source: VideoSource) -> AudioTrack | None:
    """Decode the whole first audio stream of ``source`` (an audio file, or a video's track on its own clock: 0 is
    the stream's first sample). ``None`` when ``source`` has no audio stream."""
    with _open_input(source) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        origin = float((stream.start_time or 0) * stream.time_base) if stream.time_base is not None else 0.0
        chunks: list[np.ndarray] = []
        try:
            for _, chunk in _audio_chunks(container, stream, origin):
                chunks.append(chunk)
        except av.error.FFmpegError as err:
            raise InputVideoError(f"{_name(source)!r} is truncated or corrupt: its audio stops after "
                                  f"{sum(c.shape[1] for c in chunks)} samples; {_FIX_UNREADABLE}") from err  # fmt: skip
    samples = np.concatenate(chunks, axis=1) if chunks else np.zeros((stream.codec_context.channels, 0), np.float32)
    return AudioTrack(samples=np.ascontiguousarray(samples, np.float32), sample_rate=stream.codec_context.sample_rate)


# --- encoding ----------------------------------------------------------------------------------


def _check_frames(frames: np.ndarray, pix_fmt: str) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"frames must be uint8 of shape (F, H, W, 3), got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if "420" in pix_fmt and (height % 2 or width % 2):
        raise ValueError(
            f"{pix_fmt} needs even frame sizes, got {width}x{height}; "
            f"crop or resize to {width - width % 2}x{height - height % 2}"
        )


def _fit_audio(audio: AudioTrack, num_frames: int, fps: Fraction) -> np.ndarray:
    """Cut or pad ``audio`` with silence to exactly the video's duration."""
    n = round(num_frames * audio.sample_rate / fps)
    samples = np.zeros((audio.samples.shape[0], n), np.float32)
    keep = min(n, audio.samples.shape[1])
    samples[:, :keep] = audio.samples[:, :keep]
    return samples


def encode_mp4(
    target: VideoTarget,
    frames: np.ndarray,
    fps: Fraction | float,
    audio: AudioTrack | None = None,
    *,
    crf: int = 18,
    codec: str = "libx264",
    preset: str = "medium",
    pix_fmt: str = "yuv420p",
) -> None:
    """Encode ``frames`` (uint8 ``(F, H, W, 3)`` RGB) as an MP4 at ``fps``, with AAC audio.

    The audio is cut or padded with silence to ``F / fps`` seconds. The file is written
    faststart (index first), so it streams in a browser and a truncated copy still opens and
    fails on the missing frames. A file object ``target`` receives the bytes of a temporary
    file: the MP4 muxer seeks back in its output and reopens it by name for faststart, which
    neither an object-store upload nor PyAV's file-object output supports.

    libx264 output is not byte-reproducible run to run for some frame sizes (its mbtree rate
    control, SIMD path): compare decoded pixels, never file hashes.
    """
    _check_frames(frames, pix_fmt)
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(10000)
    if rate <= 0:
        raise ValueError(f"fps {fps} must be > 0")
    if audio is not None and audio.samples.shape[0] not in _AUDIO_LAYOUTS:
        raise ValueError(f"audio has {audio.samples.shape[0]} channels; AAC here takes 1 to 7")
    settings = dict(crf=crf, codec=codec, preset=preset, pix_fmt=pix_fmt)
    if _is_path(target):
        _encode_to_path(os.fspath(target), frames, rate, audio, **settings)
        return
    with tempfile.TemporaryDirectory(prefix="reelflow-mp4-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        _encode_to_path(path, frames, rate, audio, **settings)
        with open(path, "rb") as f:
            shutil.copyfileobj(f, target)


def _encode_to_path(
    path: str, frames: np.ndarray, fps: Fraction, audio: AudioTrack | None, **settings: object
) -> None:
    container = av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"})
    try:
        _mux_all(container, frames, fps, audio, **settings)
    except BaseException:
        container.close()
        os.remove(path)
        raise
    container.close()


def _mux_all(
    container: av.container.OutputContainer,
    frames: np.ndarray,
    fps: Fraction,
    audio: AudioTrack | None,
    *,
    crf: int,
    codec: str,
    preset: str,
    pix_fmt: str,
) -> None:
    """Encode video and audio interleaved, one frame's worth of audio per frame."""
    video = container.add_stream(codec, rate=fps, options={"crf": str(crf), "preset": preset})
    video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
    sound, samples = None, None
    if audio is not None:
        layout = _AUDIO_LAYOUTS[audio.samples.shape[0]]
        sound = container.add_stream("aac", rate=audio.sample_rate, layout=layout)
        samples = _fit_audio(audio, len(frames), fps)
    for i, rgb in enumerate(frames):
        picture = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        # pts counts frames: the encoder's time base is 1 / rate. Setting picture.time_base
        # as well makes PyAV rescale the pts before the encoder is open, which garbles them.
        picture.pts = i
        container.mux(video.encode(picture))
        if sound is not None:
            lo, hi = (round(k * audio.sample_rate / fps) for k in (i, i + 1))
            if hi > lo:
                container.mux(sound.encode(_audio_frame(samples[:, lo:hi], lo, audio.sample_rate)))
    container.mux(video.encode(None))
    if sound is not None:
        container.mux(sound.encode(None))


def _audio_frame(samples: np.ndarray, pts: int, sample_rate: int) -> av.AudioFrame:
    layout = _AUDIO_LAYOUTS[samples.shape[0]]
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
    frame.sample_rate = sample_rate
    frame.pts = pts
    return frame


def encode_webm(frames: np.ndarray, fps: Fraction | float, *, crf: int = 32) -> bytes:
    """``frames`` (uint8 ``(F, H, W, 3)`` RGB) as a silent VP9 WebM, for previews a browser plays.

    VP9 in WebM is the royalty-free pair every Chromium and Firefox build decodes (open-source
    Chromium builds may lack H.264). An odd width or height is padded by one edge pixel (yuv420p).
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
        raise ValueError(f"frames must be uint8 of shape (F, H, W, 3), got {frames.dtype} {frames.shape}")
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(10000)
    with tempfile.TemporaryDirectory(prefix="reelflow-webm-") as tmp:
        path = os.path.join(tmp, "preview.webm")
        with av.open(path, "w", format="webm") as container:
            stream = container.add_stream("libvpx-vp9", rate=rate)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            stream.options = {"crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": "8"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            container.mux(stream.encode())
        with open(path, "rb") as f:
            return f.read()
