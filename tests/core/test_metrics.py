"""PSNR and SSIM against closed forms and monotone trends."""

from __future__ import annotations

import numpy as np
import pytest

from reelflow.core.metrics import PSNR_CAP_DB, psnr, ssim


def frames(seed: int = 0, shape: tuple[int, ...] = (3, 32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_psnr_of_a_known_mse() -> None:
    a = np.full((2, 16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[0] += 10  # MSE 100 on frame 0
    values = psnr(a, b)
    assert values[0] == pytest.approx(10 * np.log10(255**2 / 100))
    assert values[1] == PSNR_CAP_DB


def test_ssim_of_constant_frames_matches_the_closed_form() -> None:
    """With zero variance, SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) (Wang et al. 2004, eq. 13)."""
    a = np.full((1, 24, 24, 3), 80, np.uint8)
    b = np.full((1, 24, 24, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 80 * 120 + c1) / (80**2 + 120**2 + c1)
    assert ssim(a, b)[0] == pytest.approx(expected, rel=1e-9)


def test_identical_frames_are_perfect() -> None:
    a = frames()
    assert np.all(psnr(a, a) == PSNR_CAP_DB)
    np.testing.assert_allclose(ssim(a, a), 1.0)


def test_both_metrics_fall_as_noise_grows() -> None:
    clean = np.clip(frames(1).astype(float) * 0.5 + 64, 0, 255).astype(np.uint8)
    rng = np.random.default_rng(2)
    noisy = [np.clip(clean + rng.normal(0, s, clean.shape), 0, 255).astype(np.uint8) for s in (2, 8, 32)]
    p = [psnr(clean, n).mean() for n in noisy]
    s = [ssim(clean, n).mean() for n in noisy]
    assert p[0] > p[1] > p[2]
    assert s[0] > s[1] > s[2]


def test_ssim_is_symmetric_and_bounded() -> None:
    a, b = frames(3), frames(4)
    np.testing.assert_allclose(ssim(a, b), ssim(b, a))
    assert np.all(ssim(a, b) <= 1) and np.all(ssim(a, b) >= -1)


def test_mismatched_shapes_and_tiny_frames_are_refused() -> None:
    with pytest.raises(ValueError, match="must have the source's frame count and size"):
        psnr(frames(shape=(2, 8, 8, 3)), frames(shape=(3, 8, 8, 3)))
    with pytest.raises(ValueError, match="smaller than the 11px SSIM window"):
        ssim(frames(shape=(1, 8, 8, 3)), frames(shape=(1, 8, 8, 3)))
