"""Backward warping by optical flow, and occlusion from forward-backward consistency.

Convention (RAFT's, OpenCV's): ``flow (N, 2, H, W)`` from frame ``a`` to frame ``b`` holds, for each
pixel ``p = (x, y)`` of ``a``, its displacement ``(dx, dy)``: ``p`` shows up at ``p + flow(p)`` in ``b``.
Warping ``b`` back onto ``a`` samples ``b`` at ``p + flow(p)``; where the motion is right and
nothing is hidden, the result equals ``a``.

The sampling is bilinear on pixel coordinates, written out rather than through ``grid_sample``, so
a zero flow is exactly the identity and an integer flow exactly a shift (no normalised-coordinate
round trip: the Soundini prototype's ``(W-1)`` normalisation with ``align_corners=False`` shifts and
blurs every frame even at zero flow, methods.md 5.6). Samples outside the frame take the nearest
border pixel and are marked invalid.
"""

from __future__ import annotations

import torch

# Sundaram et al. 2010 (as Ruder et al. 2016 use it for video style transfer): a pixel is occluded when
# its forward flow and the backward flow at its destination do not cancel, relative to their size.
CONSISTENCY_RELATIVE = 0.01
CONSISTENCY_ABSOLUTE = 0.5


def warp(image: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``image (N, C, H, W)`` sampled at ``p + flow(p)`` (bilinear), and where that lands inside the frame, ``(N, H, W)``.

    Differentiable in ``image`` (for flow losses) and in ``flow``.
    """
    n, c, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=flow.dtype),
                            torch.arange(w, device=flow.device, dtype=flow.dtype), indexing="ij")  # fmt: skip
    x, y = xs + flow[:, 0], ys + flow[:, 1]
    valid = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    x, y = x.clamp(0, w - 1), y.clamp(0, h - 1)
    x0, y0 = x.floor(), y.floor()
    wx, wy = (x - x0).unsqueeze(1).to(image.dtype), (y - y0).unsqueeze(1).to(image.dtype)
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    flat = image.reshape(n, c, h * w)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat.gather(2, (yy * w + xx).reshape(n, 1, h * w).expand(n, c, h * w)).reshape(n, c, h, w)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy, valid


def occlusion(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """Pixels of frame ``a`` (``(N, H, W)``, True: occluded) whose forward flow ``a -> b`` the backward flow
    ``b -> a`` at their destination does not undo, or whose destination leaves the frame:
    ``|f + b(p + f)|^2 > 0.01 (|f|^2 + |b(p + f)|^2) + 0.5``."""
    returned, valid = warp(backward, forward)
    mismatch = (forward + returned).square().sum(1)
    size = forward.square().sum(1) + returned.square().sum(1)
    return (mismatch > CONSISTENCY_RELATIVE * size + CONSISTENCY_ABSOLUTE) | ~valid
