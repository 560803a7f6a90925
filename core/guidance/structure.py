"""Gen-1's structure level ``t_s``: how much geometric detail of the depth conditions an edit.

Gen-1 (Esser et al. 2023, §3.3; methods.md 3.3) trains on depth degraded by an information-removing
process of integer level ``t_s`` so that at sampling a small ``t_s`` follows the source's shapes
closely and a large one lets them change. The paper's exact operator is not public; this one
(methods.md 4.3) is: ``t_s`` times, blur with the binomial kernel ``[1, 2, 1] / 4`` (reflected
borders) and halve the resolution by averaging 2x2 blocks, then resize back bilinearly. ``t_s = 0``
is the identity; each level halves the finest detail that survives, so high-frequency energy falls
as ``t_s`` grows. Every step is a convex combination of depth values, so depth in ``[0, 1]`` stays
in ``[0, 1]``, and it acts on each frame alone, so it adds no flicker of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BINOMIAL = torch.tensor([1.0, 2.0, 1.0]) / 4.0


def structure_level(depth: torch.Tensor, t_s: int) -> torch.Tensor:
    """``depth`` ``(F, H, W)`` with detail removed to level ``t_s`` (>= 0), same shape and range."""
    if t_s < 0:
        raise ValueError(f"structure level t_s must be >= 0; got {t_s}")
    if t_s == 0:
        return depth
    height, width = depth.shape[-2:]
    x = depth[:, None].float()
    for _ in range(t_s):
        if min(x.shape[-2:]) < 2:
            break  # one pixel left: nothing finer to remove
        x = F.avg_pool2d(_blur(x), 2, ceil_mode=True)
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)[:, 0].to(depth.dtype)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Separable binomial blur of ``(N, 1, H, W)`` with reflected borders (replicated below 2 pixels)."""
    mode = "reflect" if min(x.shape[-2:]) > 1 else "replicate"
    kernel = _BINOMIAL.to(x.dtype)
    x = F.conv2d(F.pad(x, (1, 1, 0, 0), mode=mode), kernel.view(1, 1, 1, 3))
    return F.conv2d(F.pad(x, (0, 0, 1, 1), mode=mode), kernel.view(1, 1, 3, 1))


def laplacian_energy(depth: torch.Tensor) -> torch.Tensor:
    """Mean absolute discrete Laplacian of ``(F, H, W)`` depth, per frame: a measure of its fine detail."""
    x = depth[:, None].float()
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel).abs().mean(dim=(1, 2, 3))
