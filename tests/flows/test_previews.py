"""The edit summary's preview: source and output side by side, animated."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
from PIL import Image

from reelflow.flows.previews import PREVIEW_FRAMES, side_by_side
from reelflow.flows.reports import Clip


def clip(frames: np.ndarray) -> Clip:
    return Clip(frames, np.arange(len(frames)), np.arange(len(frames)) / 24, Fraction(24))


def test_the_preview_plays_every_frame_of_the_source_beside_its_output() -> None:
    y, x = np.mgrid[0:64, 0:96]
    source = np.stack([np.stack([(x * 2 + 9 * i) % 256, y * 3, np.full_like(x, 20 * i)], -1) for i in range(10)]).astype(np.uint8)
    output = np.zeros_like(source)
    image = Image.open(io.BytesIO(side_by_side(clip(source), clip(output))))
    assert image.format == "WEBP" and image.n_frames == 10 and image.size == (96 + 4 + 96, 64)
    image.seek(3)
    page = np.asarray(image.convert("RGB"), np.float32)
    assert np.abs(page[:, :96] - source[3]).mean() < 8 and page[:, 100:].mean() < 8  # source left, output right


def test_a_long_or_large_clip_is_thinned_and_scaled_down() -> None:
    long = np.random.default_rng(1).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)  # every frame its own
    assert Image.open(io.BytesIO(side_by_side(clip(long), clip(long)))).n_frames == PREVIEW_FRAMES
    large = np.random.default_rng(2).integers(0, 256, (2, 512, 512, 3), dtype=np.uint8)
    assert Image.open(io.BytesIO(side_by_side(clip(large), clip(large)))).size == (171 + 4 + 171, 171)
