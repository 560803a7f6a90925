"""Synthetic test clips: moving shapes on a gradient with a rising tone, made from nothing.

The demo and the tests use them so that no video has to be downloaded.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from reelflow.core.video import AudioTrack, VideoTarget, decode_frames, encode_mp4


def _synthetic_frames(
    width: int, height: int, num_frames: int, rng: np.random.Generator
) -> np.ndarray:
    """A gradient with a square sliding right and a disc bobbing left to right and back."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)[:, None, None]
    frames = np.empty((num_frames, height, width, 3), np.float32)
    frames[..., 0] = 255 * x / max(width - 1, 1)
    frames[..., 1] = 255 * y / max(height - 1, 1)
    frames[..., 2] = 96 + 64 * np.sin(2 * np.pi * t)
    side = max(2, height // 4)
    left = t * (width - side)
    square = (x >= left) & (x < left + side) & (y >= height // 4) & (y < height // 4 + side)
    cx = width * (0.5 + 0.35 * np.sin(2 * np.pi * t + rng.uniform(0, 2 * np.pi)))
    cy = height * (0.5 + 0.25 * np.cos(4 * np.pi * t))
    disc = (x - cx) ** 2 + (y - cy) ** 2 <= (height / 6) ** 2
    frames[square] = rng.integers(0, 256, 3)
    frames[disc] = rng.integers(0, 256, 3)
    return frames.round().astype(np.uint8)


def _chirp(seconds: float, sample_rate: int, base_hz: float) -> np.ndarray:
    """A sine gliding up two octaves from ``base_hz``; float32 ``(1, n)``."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    hz = base_hz * 4.0 ** (t / seconds)
    phase = 2 * np.pi * np.cumsum(hz) / sample_rate
    return (0.3 * np.sin(phase)).astype(np.float32)[None]


def write_synthetic_clip(
    target: VideoTarget,
    *,
    width: int = 96,
    height: int = 64,
    fps: int = 24,
    seconds: float = 2.0,
    sample_rate: int = 16000,
    seed: int = 0,
) -> None:
    """Write a test clip: shapes moving on a gradient, with a rising tone.

    Frames and samples depend only on the arguments; the encoded bytes may not (see
    :func:`encode_mp4`).
    """
    rng = np.random.default_rng(seed)
    num_frames = max(1, round(seconds * fps))
    frames = _synthetic_frames(width, height, num_frames, rng)
    tone = _chirp(num_frames / fps, sample_rate, base_hz=float(rng.uniform(200, 300)))
    encode_mp4(target, frames, Fraction(fps), AudioTrack(tone, sample_rate), crf=18)


def write_edited_first_frame(clip: Path, out: Path) -> None:
    """A stand-in for a first frame edited in an image editor (Videoshop's demo and tests): the clip's
    first frame with its colours rotated (R->G->B->R) and a brighter disc in the middle."""
    from PIL import Image

    frame = decode_frames(str(clip), [0])[0][..., [2, 0, 1]].astype(np.float32)
    height, width = frame.shape[:2]
    y, x = np.mgrid[0:height, 0:width]
    disc = ((x - width / 2) / (width / 5)) ** 2 + ((y - height / 2) / (height / 5)) ** 2 <= 1
    frame[disc] = 0.5 * frame[disc] + 127
    Image.fromarray(np.clip(frame.round(), 0, 255).astype(np.uint8)).save(out)
