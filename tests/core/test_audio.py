"""The sound as the CLIP-aligned audio encoders hear it (methods.md 5.3, 5.8 item 5): the log-mel spectrogram, one
window per frame over the frame's own time, the encoders' input quirks and their published checkpoint layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reelflow.core.audio.encoders import ResNetAudioEncoder, build_encoder
from reelflow.core.audio.spectrogram import (
    HOP,
    SAMPLE_RATE,
    TRAINED_COLUMNS,
    columns_of,
    frame_windows,
    log_mel,
    to_mono,
    window_inputs,
)
from reelflow.core.models import load_model
from reelflow.core.tiny_audio import TINY_ARGS, build_tiny_soundclip_resnet, build_tiny_soundclip_swin
from reelflow.schemas.errors import ModelError


def tone(hz: float, seconds: float, rate: int = SAMPLE_RATE, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_the_spectrogram_is_in_unit_range_with_the_tone_in_its_mel_band() -> None:
    mel = log_mel(tone(1000.0, 1.0))
    assert mel.shape == (128, 1 + SAMPLE_RATE // HOP) and mel.min() >= 0.0 and mel.max() == pytest.approx(1.0)
    # Slaney's mel scale is linear below 1 kHz (15 mels at 1 kHz) and spans about 60 mels to 22.05 kHz: band ~32.
    assert abs(int(mel[:, 40].argmax()) - 32) <= 2


def test_one_reference_for_the_whole_track_keeps_a_quiet_part_quieter() -> None:
    """A part 20 dB quieter sits 20/80 lower in [0, 1]: a per-window reference would make both parts look alike."""
    loud, quiet = tone(1000.0, 1.0), tone(1000.0, 1.0, amplitude=0.05)
    mel = log_mel(np.concatenate([loud, quiet]))
    band = int(mel[:, 40].argmax())
    assert mel[band, 40] - mel[band, 130] == pytest.approx(0.25, abs=0.01)


def test_resampling_to_44_1_khz_keeps_the_pitch() -> None:
    mono = to_mono(np.stack([tone(440.0, 1.0, 48_000), tone(440.0, 1.0, 48_000)]), 48_000)
    assert abs(len(mono) - SAMPLE_RATE) <= 64
    spectrum = np.abs(np.fft.rfft(mono[2048:-2048]))
    assert abs(np.fft.rfftfreq(len(mono) - 4096, 1 / SAMPLE_RATE)[spectrum.argmax()] - 440.0) < 2.0


@pytest.mark.parametrize("fps", [24.0, 25.0, 30000 / 1001])
def test_one_window_per_frame_covering_the_frames_time(fps: float) -> None:
    count, columns = 48, int(columns_of(3.0))
    starts = np.arange(count) / fps
    windows = frame_windows(starts, 1.0 / fps, 0.5, columns)
    spans = windows.seconds()
    assert spans.shape == (count, 2) and (np.diff(windows.start) >= 0).all()
    half_column = HOP / SAMPLE_RATE / 2
    assert (spans[:, 0] <= starts + half_column).all() and (spans[:, 1] >= starts + 1.0 / fps - half_column).all()
    inside = (starts >= 0.25) & (starts + 1.0 / fps <= 2.75)  # a whole half-second window around them fits on the track
    assert ((windows.stop - windows.start)[inside] == columns_of(0.5)).all()
    assert (windows.stop - windows.start)[0] < columns_of(0.5)  # the first ones are cut at the track's start


def test_windows_are_cut_at_the_tracks_end_and_left_aligned_on_zeros() -> None:
    mel = np.random.default_rng(0).random((128, 50), dtype=np.float32)
    windows = frame_windows(np.array([0.0, 0.55]), 1 / 24, 1.0, mel.shape[1])
    # 1 s is 86 columns, centred on columns 2 and 49 (the middles of the frames): cut at both ends of the track.
    assert windows.start.tolist() == [0, 6] and windows.stop.tolist() == [45, 50]
    inputs = window_inputs(mel, windows, range(2))
    assert inputs.shape == (2, 128, TRAINED_COLUMNS)
    np.testing.assert_array_equal(inputs[1, :, :44], mel[:, 6:50])
    assert not inputs[1, :, 44:].any()


def test_the_resnet_encoder_sees_the_reference_reshape_not_a_transpose() -> None:
    import cv2

    window = np.random.default_rng(1).random((1, 128, 864)).astype(np.float32)
    encoder = build_encoder("resnet18", **TINY_ARGS["resnet18"])
    expected = cv2.resize(window[0].astype(np.float64), (128, 512)).reshape(1, 1, 128, 512)  # as the reference does
    np.testing.assert_array_equal(encoder.inputs(window).numpy(), expected.astype(np.float32))
    assert not np.array_equal(expected[0, 0], cv2.resize(window[0].astype(np.float64), (128, 512)).T)


def test_the_published_checkpoints_load_with_every_key(tmp_path: Path) -> None:
    swin = load_model(str(build_tiny_soundclip_swin(tmp_path / "swin")), family="soundclip")
    resnet = load_model(str(build_tiny_soundclip_resnet(tmp_path / "resnet")), family="soundclip")  # "module." prefixed
    assert isinstance(resnet, ResNetAudioEncoder) and {"logit_scale_ai", "logit_scale_at"} <= set(swin.state_dict())
    windows = np.random.default_rng(2).random((2, 128, 864)).astype(np.float32)
    assert swin.embed(windows).shape == resnet.embed(windows).shape == (2, 512)
    checkpoint = tmp_path / "swin" / "tpami_encoder40.pth"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "logit_scale_at"}, checkpoint)
    with pytest.raises(ModelError, match=r"do not fit swin_tiny: missing \['logit_scale_at'\]"):
        load_model(str(tmp_path / "swin"), family="soundclip")


def test_the_db_scaling_is_transformers_own_power_to_db_with_the_loudest_bin_as_reference() -> None:
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    waveform = np.concatenate([tone(440.0, 0.5), tone(3000.0, 0.5, amplitude=0.05)]).astype(np.float64)
    filters = mel_filter_bank(num_frequency_bins=1025, num_mel_filters=128, min_frequency=0.0, max_frequency=SAMPLE_RATE / 2,
                              sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")  # fmt: skip
    args = dict(window=window_function(2048, "hann"), frame_length=2048, hop_length=HOP, power=2.0, center=True,
                pad_mode="reflect", mel_filters=filters, mel_floor=0.0, dtype=np.float64)  # fmt: skip
    loudest = float(spectrogram(waveform, **args).max())
    theirs = spectrogram(waveform, **args, log_mel="dB", reference=loudest, min_value=1e-10, db_range=80.0) / 80.0 + 1.0
    np.testing.assert_allclose(log_mel(waveform.astype(np.float32)), theirs, rtol=0, atol=1e-4)
