"""The evaluation metrics (methods.md 6.2b) against independent implementations (torchmetrics) and the properties the
papers' definitions imply: a clip of identical frames is perfectly consistent, a shift by a known flow warps back to
almost nothing while shuffled frames do not, frame accuracy flips with the prompts, masked metrics see only the mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from reelflow.core import evaluation
from reelflow.core.metrics import psnr, ssim


def frames(seed: int = 0, shape: tuple[int, ...] = (3, 40, 48, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth(seed: int = 0, shape: tuple[int, ...] = (3, 40, 48, 3)) -> np.ndarray:
    """Frames with structure at several scales, so SSIM is far from 0 and 1."""
    x = torch.from_numpy(frames(seed, shape)).permute(0, 3, 1, 2).double()
    blurred = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    return blurred.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def _torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).double()


def test_psnr_and_ssim_agree_with_torchmetrics() -> None:
    a, b = smooth(1), smooth(2)
    b = np.clip(a.astype(int) + (b.astype(int) - 128) // 4, 0, 255).astype(np.uint8)  # a noisy copy
    reference_psnr = peak_signal_noise_ratio(_torch(b), _torch(a), data_range=255.0, reduction="none", dim=(1, 2, 3))
    np.testing.assert_allclose(psnr(a, b), reference_psnr.numpy(), rtol=1e-6)  # torchmetrics works in float32
    _, full = structural_similarity_index_measure(_torch(b), _torch(a), gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                                  data_range=255.0, reduction="none", return_full_image=True)  # fmt: skip
    valid = full[..., 5:-5, 5:-5]  # torchmetrics pads by reflection; the windows that fit are Wang et al.'s
    np.testing.assert_allclose(ssim(a, b), valid.mean(dim=(1, 2, 3)).numpy(), rtol=1e-6, atol=1e-8)
    assert 0.2 < float(valid.mean()) < 0.99


def test_masked_psnr_and_ssim_see_only_the_mask() -> None:
    a = smooth(3)
    mask = np.zeros(a.shape[:3], bool)
    mask[:, 10:30, 12:36] = True
    b = a.copy()
    b[~mask] = 255 - b[~mask]  # wreck everything outside
    np.testing.assert_array_equal(evaluation.masked_psnr(a, b, mask), 100.0)
    np.testing.assert_allclose(evaluation.masked_ssim(a, b, mask[:, :, :].copy() & _interior(mask, 5)), 1.0)
    assert (evaluation.masked_psnr(a, b, ~mask) < 20).all() and (evaluation.masked_ssim(a, b, ~mask) < 0.5).all()
    whole = np.ones_like(mask)
    np.testing.assert_allclose(evaluation.masked_psnr(a, b, whole), psnr(a, b), rtol=1e-12)
    np.testing.assert_allclose(evaluation.masked_ssim(a, b, whole), ssim(a, b), rtol=1e-12)
    assert np.isnan(evaluation.masked_psnr(a, b, np.zeros_like(mask))).all()


def _interior(mask: np.ndarray, margin: int) -> np.ndarray:
    """The pixels whose whole SSIM window (half-width ``margin``) lies in the mask."""
    t = torch.from_numpy(mask[:, None].astype(np.float64))
    return (-torch.nn.functional.max_pool2d(-t, 2 * margin + 1, stride=1, padding=margin))[:, 0].numpy() > 0.5


def test_a_clip_of_identical_frames_is_perfectly_consistent() -> None:
    one = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    same = one.expand(5, -1) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])[:, None]  # any length: cosines
    np.testing.assert_allclose(evaluation.consecutive_consistency(same), 1.0)
    np.testing.assert_allclose(evaluation.all_pairs_consistency(same), 1.0)
    np.testing.assert_allclose(evaluation.subject_consistency(same), 1.0)
    varied = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    assert (evaluation.consecutive_consistency(varied) < 0.9).all()
    e = torch.nn.functional.normalize(varied, dim=-1)
    pairs = [float(e[i] @ e[j]) for i in range(5) for j in range(5) if i != j]
    assert evaluation.all_pairs_consistency(varied).mean() == pytest.approx(np.mean(pairs))  # the mean over all pairs


def test_frame_accuracy_flips_when_the_prompts_are_swapped() -> None:
    generator = torch.Generator().manual_seed(2)
    target, source = torch.randn(16, generator=generator), torch.randn(16, generator=generator)
    images = torch.stack([target + 0.3 * torch.randn(16, generator=generator) for _ in range(4)])
    np.testing.assert_array_equal(evaluation.frame_accuracy(images, target, source), 1.0)
    np.testing.assert_array_equal(evaluation.frame_accuracy(images, source, target), 0.0)
    assert (evaluation.text_alignment(images, target) > evaluation.text_alignment(images, source)).all()


def test_warp_error_is_near_zero_for_a_known_shift_and_large_for_shuffled_frames() -> None:
    base = smooth(4, (1, 48, 64, 3))[0]
    clip = np.stack([np.roll(base, -2 * i, axis=1) for i in range(4)])  # the scene moves 2 px left per frame
    forward = np.zeros((3, 2, 48, 64))
    forward[:, 0] = -2.0  # a pixel at x in frame i is at x - 2 in frame i + 1
    shifted = evaluation.warp_error(clip, forward)
    assert (shifted < 1e-12).all()  # the wrapped-around columns sample outside and are left out
    shuffled = evaluation.warp_error(smooth(5, clip.shape), forward)
    assert (shuffled > 1e-3).all()
    corrupted = clip.copy()
    corrupted[1::2, :, :32] = 0  # frames 1 and 3 blacked out left of x = 32, where every pair's error then lies
    occluded = np.zeros((3, 48, 64), bool)
    occluded[:, :, :34] = True
    assert (evaluation.warp_error(corrupted, forward) > 1e-2).all()
    assert (evaluation.warp_error(corrupted, forward, occluded) < 1e-12).all()  # occluded pixels are left out
    with pytest.raises(ValueError, match=r"the flow is \(3, 2, 48, 32\) but 4 frames of 64x48 need \(3, 2, 48, 64\)"):
        evaluation.warp_error(clip, forward[..., :32])


def test_subject_consistency_clamps_each_cosine_at_zero_as_vbench_does() -> None:
    first, opposite = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])
    np.testing.assert_allclose(evaluation.subject_consistency(torch.stack([first, opposite, opposite])), [0.0, 0.5])


def test_flicker_is_the_mean_absolute_step_between_frames() -> None:
    assert evaluation.flicker(frames(6, (1, 8, 8, 3))).shape == (0,)  # one frame: no pair
    still = np.repeat(frames(6, (1, 8, 8, 3)), 3, axis=0)
    np.testing.assert_array_equal(evaluation.flicker(still), 0.0)
    steps = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 51, 0)])
    np.testing.assert_allclose(evaluation.flicker(steps), [0.2, 0.2])
