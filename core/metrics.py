"""Full-reference frame metrics: PSNR and SSIM per frame.

SSIM follows Wang et al. 2004 ("Image Quality Assessment: From Error Visibility to Structural
Similarity", §III-B/C): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, dynamic range
L = 255, computed per RGB channel over valid windows (no padding) and averaged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0
_L = 255.0
_C1 = (0.01 * _L) ** 2
_C2 = (0.03 * _L) ** 2


def psnr(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """PSNR in dB of uint8 frames ``(F, H, W, C)``, one value per frame; identical frames give PSNR_CAP_DB."""
    _check_pair(reference, test)
    diff = reference.astype(np.float64) - test.astype(np.float64)
    mse = (diff**2).reshape(len(diff), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(_L**2 / mse)
    return np.minimum(values, PSNR_CAP_DB)


def ssim(reference: np.ndarray, test: np.ndarray, *, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Mean SSIM of uint8 frames ``(F, H, W, C)``, one value per frame, in [-1, 1] (1 for identical frames)."""
    return ssim_map(reference, test, window=window, sigma=sigma).mean(dim=(1, 2, 3)).numpy()


def ssim_map(reference: np.ndarray, test: np.ndarray, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The SSIM of every valid window, ``(F, C, H - window + 1, W - window + 1)`` float64: entry ``(y, x)`` is the
    window centred on pixel ``(y + window // 2, x + window // 2)``."""
    _check_pair(reference, test)
    if min(reference.shape[1:3]) < window:
        raise ValueError(
            f"frames of {reference.shape[1:3]} are smaller than the {window}px SSIM window; "
            f"decode at least {window}x{window} pixels or pass a smaller window"
        )
    x = torch.from_numpy(reference).permute(0, 3, 1, 2).double()
    y = torch.from_numpy(test).permute(0, 3, 1, 2).double()
    g = _gaussian_1d(window, sigma)
    channels = x.shape[1]
    rows = g.view(1, 1, 1, window).expand(channels, 1, 1, window).contiguous()
    cols = g.view(1, 1, window, 1).expand(channels, 1, window, 1).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        # The 2-D Gaussian is separable: two 1-D passes cost 2k instead of k^2 per pixel.
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + _C1) * (2 * cov + _C2)) / ((mu_x**2 + mu_y**2 + _C1) * (var_x + var_y + _C2))


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _check_pair(reference: np.ndarray, test: np.ndarray) -> None:
    if reference.shape != test.shape:
        raise ValueError(
            f"cannot compare frames of shape {reference.shape} with {test.shape}; "
            "edited frames must have the source's frame count and size"
        )
    if reference.ndim != 4:
        raise ValueError(f"expected frames (F, H, W, C), got shape {reference.shape}")
