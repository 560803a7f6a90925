"""Warping and occlusion (methods.md 5.8, 1), and both flow backends on frames whose motion is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reelflow.core.flow.estimate import Farneback, pair_flows, raft_flow
from reelflow.core.flow.warp import occlusion, warp
from reelflow.core.tiny import tiny_raft


def texture(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture (uint8), something flow can lock onto."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 8, width // 8, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return (smooth.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_zero_flow_is_exactly_the_identity() -> None:
    image = torch.randn(2, 3, 16, 20)
    warped, valid = warp(image, torch.zeros(2, 2, 16, 20))
    assert torch.equal(warped, image) and valid.all()


def test_a_constant_integer_flow_is_a_shift() -> None:
    image, flow = torch.randn(1, 3, 16, 20), torch.zeros(1, 2, 16, 20)
    flow[:, 0], flow[:, 1] = 3.0, -2.0  # each pixel shows up 3 to the right and 2 up in the other frame
    warped, valid = warp(image, flow)
    shifted = torch.roll(image, shifts=(2, -3), dims=(2, 3))
    assert torch.equal(warped[..., 2:, :-3], shifted[..., 2:, :-3])
    assert valid[0, 2:, :-3].all() and not valid[0, :2].any() and not valid[0, :, -3:].any()


def test_warping_is_differentiable_in_the_image() -> None:
    image = torch.randn(1, 1, 8, 8, requires_grad=True)
    flow = torch.full((1, 2, 8, 8), 0.5)
    warp(image, flow)[0].sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_consistent_motion_is_occluded_only_where_it_leaves_the_frame() -> None:
    forward = torch.zeros(1, 2, 16, 20)
    forward[:, 0] = 2.0
    assert torch.equal(occlusion(forward, -forward)[0], torch.arange(20).expand(16, 20) >= 18)
    assert occlusion(forward, torch.zeros_like(forward))[0, :, :18].all()  # the way back does not undo the way there


def test_farneback_recovers_a_known_shift() -> None:
    frame = texture()
    moved = np.roll(frame, shift=(1, 2), axis=(0, 1))  # content moves 2 right, 1 down
    forward, backward = pair_flows(Farneback(), np.stack([frame, moved]))
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    assert forward.shape == backward.shape == (1, 2, 48, 64)
    assert torch.allclose(forward[inner].mean(dim=(2, 3)), torch.tensor([[2.0, 1.0]]), atol=0.25)
    assert torch.allclose(backward[inner].mean(dim=(2, 3)), torch.tensor([[-2.0, -1.0]]), atol=0.25)


@pytest.mark.parametrize("size", [(48, 64), (44, 60)])
def test_raft_gives_flow_at_the_frames_size_also_off_its_multiple(size: tuple[int, int]) -> None:
    frames = np.stack([texture(*size), texture(*size, seed=1), texture(*size, seed=2)])
    forward, backward = pair_flows(raft_flow(tiny_raft(), num_flow_updates=2), frames)
    assert forward.shape == backward.shape == (2, 2, *size) and forward.dtype == torch.float32
    assert torch.isfinite(forward).all()


def test_warping_inside_the_frame_is_torchs_grid_sample_on_pixel_centres() -> None:
    generator = torch.Generator().manual_seed(3)
    image, flow = torch.randn(2, 3, 12, 16, generator=generator), torch.rand(2, 2, 12, 16, generator=generator) * 4 - 2
    ours, valid = warp(image, flow)
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(16.0), indexing="ij")
    grid = torch.stack([(xs + flow[:, 0]) / 15 * 2 - 1, (ys + flow[:, 1]) / 11 * 2 - 1], dim=-1)
    theirs = torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
    torch.testing.assert_close(ours.permute(0, 2, 3, 1)[valid], theirs.permute(0, 2, 3, 1)[valid], rtol=1e-5, atol=1e-5)
