"""Sound as the CLIP-aligned audio encoders of Soundini and its predecessor were trained to hear it
(methods.md 5.3), one window per video frame.

The reference pipeline (kuai-lab/sound-guided-semantic-image-manipulation, kuai-lab/soundini):
``librosa.load(sr=44100)`` (mono), ``librosa.feature.melspectrogram(n_mels=128)`` (n_fft 2048, hop 512,
Hann, centred with reflection padding as librosa before 0.10 did when the encoders were trained,
power 2, Slaney mel scale and norm), ``power_to_db(ref=max) / 80 + 1`` (in [0, 1]: the
top 80 dB), a crop of 864 columns (about 10 s) or the audio left-aligned on 864 columns of zeros,
then a resize for the encoder (see :mod:`reelflow.core.audio.encoders`). Here the mel spectrogram
is computed by transformers' librosa-compatible ``audio_utils``; the resampling by PyAV (FFmpeg's
swresample) instead of librosa's soxr, which differs only in the filter's last bits.

Two choices of ours, both documented in the stage: the dB reference is the loudest bin of the whole
track, not of each window, so a quiet frame stays quiet next to a loud one (the loudness dynamics
Soundini's per-frame guidance is meant to follow); and frame ``i``'s window of ``window_seconds``
is centred on the middle of the frame's own time span, cut where the track ends, and left-aligned
on the 864 columns as the training padding path does.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

SAMPLE_RATE = 44_100
N_MELS = 128
N_FFT = 2048
HOP = 512
TRAINED_COLUMNS = 864  # the encoders' input length, about 10 s
TOP_DB = 80.0


@dataclass(frozen=True)
class FrameWindows:
    """Frame ``i``'s window: indices ``[start[i], stop[i])`` (spectrogram columns, or samples for an encoder that
    reads the waveform) and their time span in seconds, ``unit`` seconds per index."""

    start: np.ndarray  # (F,) int
    stop: np.ndarray  # (F,) int
    unit: float = HOP / SAMPLE_RATE

    def seconds(self) -> np.ndarray:
        """``(F, 2)``: where each window starts and ends on the track's clock (a column is centred on its sample)."""
        return np.stack([self.start, self.stop], axis=1).astype(np.float64) * self.unit


def to_mono(samples: np.ndarray, sample_rate: int, rate: int = SAMPLE_RATE) -> np.ndarray:
    """``samples (channels, n)`` float32 averaged to mono and resampled to ``rate`` (44.1 kHz by default) with PyAV
    (swresample)."""
    mono = np.ascontiguousarray(samples.mean(axis=0, keepdims=True), np.float32)
    if sample_rate == rate or mono.shape[1] == 0:
        return mono[0]
    frame = av.AudioFrame.from_ndarray(mono, format="fltp", layout="mono")
    frame.sample_rate, frame.pts = sample_rate, 0
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=rate)
    chunks = [out.to_ndarray()[0] for f in (frame, None) for out in resampler.resample(f)]
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def log_mel(waveform: np.ndarray) -> np.ndarray:
    """``(128, T)`` float32 in [0, 1] of a 44.1 kHz mono waveform: ``power_to_db(mel, ref=max) / 80 + 1`` with the
    loudest bin of the whole waveform as 0 dB and everything 80 dB below it as 0."""
    filters = mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=N_MELS, min_frequency=0.0,
                              max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")  # fmt: skip
    padded = waveform if len(waveform) >= N_FFT // 2 + 1 else np.pad(waveform, (0, N_FFT // 2 + 1 - len(waveform)))
    power = spectrogram(padded.astype(np.float64), window_function(N_FFT, "hann"), frame_length=N_FFT, hop_length=HOP,
                        power=2.0, center=True, pad_mode="reflect", mel_filters=filters, mel_floor=0.0, dtype=np.float64)  # fmt: skip
    db = 10.0 * np.log10(np.maximum(power, 1e-10))
    db -= 10.0 * np.log10(max(float(power.max()), 1e-10))
    return (np.maximum(db, -TOP_DB) / TOP_DB + 1.0).astype(np.float32)


def columns_of(seconds: np.ndarray | float) -> np.ndarray:
    """The spectrogram column centred nearest each time (column ``j`` is centred on sample ``j * hop``)."""
    return np.rint(np.asarray(seconds, np.float64) * SAMPLE_RATE / HOP).astype(np.int64)


def frame_windows(frame_starts: np.ndarray, frame_seconds: float, window_seconds: float, columns: int) -> FrameWindows:
    """Each frame's window: ``window_seconds`` centred on the middle of ``[start, start + frame_seconds)`` (times on
    the track's clock), cut to the track's ``columns``; empty (silence) for a frame whose window misses the track."""
    width = max(1, min(TRAINED_COLUMNS, int(columns_of(window_seconds))))
    centre = columns_of(np.asarray(frame_starts, np.float64) + frame_seconds / 2.0)
    return centred_windows(centre - width // 2, width, columns, HOP / SAMPLE_RATE)


def centred_windows(first: np.ndarray, width: int, length: int, unit: float) -> FrameWindows:
    """Windows of ``width`` indices from ``first`` (``(F,)``, possibly outside ``[0, length)``) cut to ``[0, length)``:
    empty where a window misses it."""
    start = np.clip(first, 0, length)
    stop = np.clip(first + width, start, length)
    return FrameWindows(start=start, stop=stop, unit=unit)


def window_inputs(mel: np.ndarray, windows: FrameWindows, indices: range | np.ndarray) -> np.ndarray:
    """``(n, 128, 864)`` float32: each window's columns left-aligned on zeros (the training padding path)."""
    out = np.zeros((len(indices), N_MELS, TRAINED_COLUMNS), np.float32)
    for row, i in enumerate(indices):
        piece = mel[:, windows.start[i] : windows.stop[i]]
        out[row, :, : piece.shape[1]] = piece[:, :TRAINED_COLUMNS]
    return out
