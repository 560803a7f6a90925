"""Dense optical flow between neighbouring frames: RAFT (torchvision) or OpenCV's Farneback (no weights).

Both return ``(N, 2, H, W)`` float32 flow in pixels at the frames' size, from the first frame of
each pair to the second (see :mod:`reelflow.core.flow.warp` for the convention). Frames come in as
uint8 ``(N, H, W, 3)``.

RAFT is fed what torchvision's ``Raft_*_Weights.transforms()`` give it: floats in [-1, 1]
(the Soundini prototype fed [-1, 1] frames to the original RAFT, which divides by 255 again, so
its flows were nearly constant; methods.md 5.6). Sides are scaled up to RAFT's multiple of 8, and
to the smallest side its correlation pyramid takes (128 pixels for 4 levels), when needed, and the
flow scaled back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

FlowFn = Callable[[np.ndarray, np.ndarray], torch.Tensor]
RAFT_MULTIPLE = 8


def raft_flow(model: Any, num_flow_updates: int = 12) -> FlowFn:
    """A flow function over torchvision's RAFT (``raft_large``, ``raft_small``), ``num_flow_updates`` refinements."""

    levels = getattr(getattr(model, "corr_block", None), "num_levels", 4)
    smallest = RAFT_MULTIPLE * 2 * 2 ** (levels - 1)  # the coarsest correlation level still 2 features wide

    def flow(first: np.ndarray, second: np.ndarray) -> torch.Tensor:
        h, w = first.shape[1:3]
        size = tuple(max(smallest, -(-side // RAFT_MULTIPLE) * RAFT_MULTIPLE) for side in (h, w))
        a, b = (_raft_input(frames, size, model) for frames in (first, second))
        with torch.inference_mode():
            predicted = model(a, b, num_flow_updates=num_flow_updates)[-1].float().cpu()
        if size == (h, w):
            return predicted
        scale = torch.tensor([w / size[1], h / size[0]]).view(1, 2, 1, 1)
        return F.interpolate(predicted, size=(h, w), mode="bilinear", align_corners=False) * scale

    return flow


def _raft_input(frames: np.ndarray, size: tuple[int, int], model: Any) -> torch.Tensor:
    parameter = next(model.parameters())
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    return pixels.to(parameter.device, parameter.dtype)


@dataclass(frozen=True)
class Farneback:
    """OpenCV's ``calcOpticalFlowFarneback`` settings (its documented example values by default)."""

    pyr_scale: float = 0.5
    levels: int = 3
    winsize: int = 15
    iterations: int = 3
    poly_n: int = 5
    poly_sigma: float = 1.2

    def __call__(self, first: np.ndarray, second: np.ndarray) -> torch.Tensor:
        import cv2

        flows = []
        for a, b in zip(first, second, strict=True):
            grey = [cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY) for x in (a, b)]
            flows.append(cv2.calcOpticalFlowFarneback(grey[0], grey[1], None, self.pyr_scale, self.levels, self.winsize,
                                                      self.iterations, self.poly_n, self.poly_sigma, 0))  # fmt: skip
        return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).float()


def pair_flows(flow: FlowFn, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (``i -> i+1``) and backward (``i+1 -> i``) flow of each neighbouring pair of ``frames (N+1, H, W, 3)``,
    each ``(N, 2, H, W)``, from one call on the pairs both ways."""
    first, second = frames[:-1], frames[1:]
    both = flow(np.concatenate([first, second]), np.concatenate([second, first]))
    return both[: len(first)], both[len(first) :]
