"""Video and audio I/O: round trips through real MP4 files, frame selection, and bad inputs."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from reelflow.core import video
from reelflow.core.synthetic import write_synthetic_clip
from tests.fixtures import write_audio_only
from reelflow.core.video import (
    AudioTrack,
    FrameSelection,
    VideoInfo,
    decode_audio,
    decode_frames,
    encode_mp4,
    probe_video,
    select_frames,
)
from reelflow.schemas.errors import InputVideoError

RATE = 16000


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_synthetic_clip(path, width=96, height=64, fps=24, seconds=2.0, sample_rate=RATE)
    return path


@pytest.fixture(scope="module")
def clip_frames(clip: Path) -> np.ndarray:
    return decode_frames(clip, range(48))


def _info(num_frames: int = 48, fps: int = 24) -> VideoInfo:
    return VideoInfo(
        width=96, height=64, fps=Fraction(fps), num_frames=num_frames,
        duration=num_frames / fps, has_audio=True, audio_sample_rate=RATE,
        audio_channels=1, codec="h264",
    )


def _write_plain_mp4(path: Path, frames: np.ndarray, **options: str) -> None:
    """An MP4 the way most tools write it: index after the data, unlike encode_mp4's output."""
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24, options=options)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _zero_crossings(x: np.ndarray) -> int:
    return int(np.count_nonzero(np.diff(np.signbit(x))))


# --- probe, decode, encode round trip ------------------------------------------------------


def test_probe_reads_the_synthetic_clip(clip: Path) -> None:
    info = probe_video(clip)
    assert (info.width, info.height) == (96, 64)
    assert info.fps == Fraction(24)
    assert info.num_frames == 48
    assert info.duration == pytest.approx(2.0, abs=1e-6)
    assert info.has_audio and info.audio_sample_rate == RATE and info.audio_channels == 1
    assert info.audio_duration == pytest.approx(2.0, abs=0.05)
    assert info.codec == "h264"


def test_decoded_frames_move(clip_frames: np.ndarray) -> None:
    assert clip_frames.shape == (48, 64, 96, 3) and clip_frames.dtype == np.uint8
    steps = np.abs(np.diff(clip_frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    assert (steps > 0.5).all(), "every frame differs from the one before"


def test_reencode_keeps_timing_audio_and_pixels(clip: Path, clip_frames: np.ndarray, tmp_path: Path) -> None:
    info = probe_video(clip)
    audio = decode_audio(clip, 0.0, info.duration)
    out = tmp_path / "again.mp4"
    encode_mp4(out, clip_frames, info.fps, audio, crf=18)

    again = probe_video(out)
    assert again.fps == info.fps and again.num_frames == info.num_frames
    assert again.duration == pytest.approx(info.duration, abs=1 / 24)
    assert again.has_audio and again.audio_sample_rate == RATE
    assert again.audio_duration == pytest.approx(again.duration, abs=0.05)
    decoded = decode_frames(out, range(again.num_frames))
    assert np.abs(decoded.astype(np.int16) - clip_frames).mean() < 6


def test_subset_decode_matches_full_decode(clip: Path, clip_frames: np.ndarray) -> None:
    indices = [40, 3, 3, 47, 0]
    np.testing.assert_array_equal(decode_frames(clip, indices), clip_frames[indices])


def test_decode_after_seeking_to_a_keyframe(clip_frames: np.ndarray, tmp_path: Path) -> None:
    gop = tmp_path / "gop.mp4"
    _write_plain_mp4(gop, clip_frames, g="6")
    full = decode_frames(gop, range(48))
    for indices in ([30, 31, 45], [13], [47, 6]):
        np.testing.assert_array_equal(decode_frames(gop, indices), full[indices])


def test_decode_falls_back_to_the_start_when_a_seek_overshoots(
    clip_frames: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gop = tmp_path / "gop.mp4"
    _write_plain_mp4(gop, clip_frames, g="6")
    full = decode_frames(gop, range(48))
    monkeypatch.setattr(video, "_pts_index", lambda *args: 47)
    np.testing.assert_array_equal(decode_frames(gop, [30, 31]), full[[30, 31]])


def test_file_object_source(clip: Path, clip_frames: np.ndarray) -> None:
    with open(clip, "rb") as f:
        assert probe_video(f) == probe_video(clip)
        assert f.tell() == 0
        np.testing.assert_array_equal(decode_frames(f, [0, 30]), clip_frames[[0, 30]])
        track = decode_audio(f, 0.0, 1.0)
    assert track is not None and track.samples.shape == (1, RATE)


class _Unseekable(io.RawIOBase):
    """Like an object-store upload: write-only, no seek."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:
        self.data += b
        return len(b)


def test_encode_to_file_objects(clip_frames: np.ndarray) -> None:
    seekable, unseekable = io.BytesIO(), _Unseekable()
    for target in (seekable, unseekable):
        encode_mp4(target, clip_frames[:12], 24)
    for data in (seekable.getvalue(), bytes(unseekable.data)):
        info = probe_video(io.BytesIO(data))
        assert info.num_frames == 12 and not info.has_audio


def test_encode_float_fps_becomes_exact_fraction(clip_frames: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "ntsc.mp4"
    encode_mp4(out, clip_frames[:12], 30000 / 1001)
    info = probe_video(out)
    assert info.fps == Fraction(30000, 1001)
    assert info.num_frames == 12
    assert info.duration == pytest.approx(12 * 1001 / 30000, abs=1001 / 30000)


@pytest.mark.parametrize("seconds", [0.3, 3.0])
def test_encode_fits_audio_to_video(clip_frames: np.ndarray, tmp_path: Path, seconds: float) -> None:
    stereo = np.full((2, round(seconds * RATE)), 0.25, np.float32)
    out = tmp_path / "fit.mp4"
    encode_mp4(out, clip_frames[:24], 24, AudioTrack(stereo, RATE))
    info = probe_video(out)
    assert info.audio_channels == 2
    assert info.audio_duration == pytest.approx(1.0, abs=0.05)


def test_encode_rejects_odd_sizes(clip_frames: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        encode_mp4(tmp_path / "odd.mp4", clip_frames[:2, :63], 24)
    assert not (tmp_path / "odd.mp4").exists()


# --- frame selection -----------------------------------------------------------------------


def test_select_stride() -> None:
    sel = select_frames(_info(), FrameSelection(stride=2))
    assert sel.indices == tuple(range(0, 48, 2))
    assert sel.fps == Fraction(12)
    assert (sel.start, sel.end) == (0.0, 2.0)


@pytest.mark.parametrize(("target", "stride"), [(8.0, 3), (10.0, 2), (24.0, 1), (100.0, 1)])
def test_select_target_fps(target: float, stride: int) -> None:
    sel = select_frames(_info(), FrameSelection(fps=target))
    assert sel.indices[:2] == (0, stride)
    assert sel.fps == Fraction(24, stride)


def test_select_start_and_count() -> None:
    sel = select_frames(_info(), FrameSelection(start=0.5, num_frames=5, stride=2))
    assert sel.indices == (12, 14, 16, 18, 20)
    assert sel.start == pytest.approx(0.5)
    assert sel.end == pytest.approx(22 / 24)
    assert sel.end - sel.start == pytest.approx(len(sel.indices) / sel.fps)


def test_select_span_is_clipped_at_the_end() -> None:
    sel = select_frames(_info(num_frames=47), FrameSelection(stride=2))
    assert sel.indices[-1] == 46
    assert sel.end == pytest.approx(47 / 24)


def test_select_start_on_a_frame_boundary() -> None:
    # 1.16 * 25 == 28.999999999999996 in floats: frame 29 starts at exactly 1.16 s.
    assert select_frames(_info(fps=25), FrameSelection(start=1.16)).indices[0] == 29


def test_select_start_past_the_end() -> None:
    with pytest.raises(InputVideoError, match=r"start 2\.5s.*2\.000s"):
        select_frames(_info(), FrameSelection(start=2.5))


def test_selection_rejects_stride_with_fps() -> None:
    with pytest.raises(ValueError, match="not both"):
        FrameSelection(stride=2, fps=12.0)


# --- audio ---------------------------------------------------------------------------------


def test_audio_is_a_rising_tone(clip: Path) -> None:
    track = decode_audio(clip, 0.0, 2.0)
    assert track is not None and track.sample_rate == RATE
    assert track.samples.shape == (1, 2 * RATE) and track.samples.dtype == np.float32
    middle = track.samples[0, RATE // 2 : 3 * RATE // 2]
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.1)
    first, last = track.samples[0, : RATE // 2], track.samples[0, -RATE // 2 :]
    assert _zero_crossings(last) > 2 * _zero_crossings(first)


def test_audio_trimmed_to_the_selected_span(clip: Path) -> None:
    sel = select_frames(probe_video(clip), FrameSelection(start=0.5, num_frames=12, stride=2))
    span = decode_audio(clip, sel.start, sel.end)
    full = decode_audio(clip, 0.0, 2.0)
    lo, hi = round(sel.start * RATE), round(sel.end * RATE)
    assert span is not None and full is not None
    assert span.samples.shape == (1, hi - lo) and hi - lo == RATE
    np.testing.assert_array_equal(span.samples, full.samples[:, lo:hi])


def test_audio_past_the_track_is_silence(clip: Path) -> None:
    track = decode_audio(clip, 1.5, 3.0)
    assert track is not None and track.samples.shape == (1, round(1.5 * RATE))
    assert np.abs(track.samples[:, : RATE // 4]).max() > 0.1
    assert not track.samples[:, RATE // 2 + 100 :].any()


def test_audio_stays_in_sync_with_the_video(clip_frames: np.ndarray, tmp_path: Path) -> None:
    t = np.arange(RATE) / RATE
    tone = np.where(t >= 0.5, 0.5 * np.sin(2 * np.pi * 440 * t), 0.0).astype(np.float32)
    out = tmp_path / "onset.mp4"
    encode_mp4(out, clip_frames[:24], 24, AudioTrack(tone[None], RATE))
    for start in (0.0, 0.25):
        track = decode_audio(out, start, 1.0)
        assert track is not None
        onset = np.argmax(np.abs(track.samples[0]) > 0.25) / RATE + start
        assert onset == pytest.approx(0.5, abs=0.01)


def test_no_audio_stream_gives_none(clip_frames: np.ndarray, tmp_path: Path) -> None:
    silent = tmp_path / "silent.mp4"
    encode_mp4(silent, clip_frames[:6], 24)
    assert decode_audio(silent, 0.0, 0.25) is None
    assert not probe_video(silent).has_audio


# --- bad inputs ----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputVideoError, match="not found.*nope.mp4"):
        probe_video(tmp_path / "nope.mp4")


def test_zero_byte_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(InputVideoError, match="empty"):
        probe_video(empty)
    with pytest.raises(InputVideoError, match="empty"):
        probe_video(io.BytesIO())


def test_text_file_named_mp4(tmp_path: Path) -> None:
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 20)
    with pytest.raises(InputVideoError, match="cannot read .*notes.mp4.* not a media file"):
        probe_video(fake)


def test_truncated_faststart_mp4_fails_on_decode(clip: Path, tmp_path: Path) -> None:
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    assert probe_video(cut).num_frames == 48, "the index is up front, so headers still read"
    with pytest.raises(InputVideoError, match=r"truncated or corrupt: expected 48 frames, decoded \d+"):
        decode_frames(cut, range(48))
    with pytest.raises(InputVideoError, match="truncated or corrupt: expected 32000 audio samples"):
        decode_audio(cut, 0.0, 2.0)


def test_corrupt_bytes_fail_on_decode(clip: Path, tmp_path: Path) -> None:
    data = bytearray(clip.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = np.random.default_rng(1).integers(0, 256, 2000, np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputVideoError, match="truncated or corrupt: expected 48 frames"):
        decode_frames(bad, range(48))
    with pytest.raises(InputVideoError, match="truncated or corrupt: expected 32000 audio samples"):
        decode_audio(bad, 0.0, 2.0)


def test_truncated_mp4_with_index_at_end_fails_on_probe(clip_frames: np.ndarray, tmp_path: Path) -> None:
    whole = tmp_path / "whole.mp4"
    _write_plain_mp4(whole, clip_frames[:24])
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    with pytest.raises(InputVideoError, match="truncated"):
        probe_video(cut)


def test_audio_only_file(tmp_path: Path) -> None:
    m4a = tmp_path / "voice.m4a"
    write_audio_only(m4a)
    with pytest.raises(InputVideoError, match=r"no video stream \(streams: audio \(aac\)\)"):
        probe_video(m4a)
    track = decode_audio(m4a, 0.0, 0.5)
    assert track is not None and np.abs(track.samples).max() > 0.1


def test_a_webm_preview_decodes_with_pyav_to_the_frames_at_their_rate(clip_frames: np.ndarray) -> None:
    """encode_webm checked by an independent decoder (FFmpeg's VP9 through PyAV): every frame, the rate, the pixels."""
    frames = np.ascontiguousarray(clip_frames[:, :63])  # an odd height is padded by one edge row
    with av.open(io.BytesIO(video.encode_webm(frames, Fraction(24)))) as container:
        stream = container.streams.video[0]
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        assert (stream.codec_context.name, container.format.name.split(",")[0]) == ("vp9", "matroska")
        assert stream.average_rate == 24
    assert decoded.shape == (len(frames), 64, frames.shape[2], 3)
    assert np.abs(decoded[:, :63].astype(np.float32) - frames).mean() < 6  # lossy, but the same pictures
