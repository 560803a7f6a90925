"""Gen-1's structure level and temporal guidance (methods.md 3.8)."""

from __future__ import annotations

import pytest
import torch

from reelflow.core.guidance.structure import laplacian_energy, structure_level
from reelflow.core.guidance.temporal import temporal_guidance


def depth_maps() -> torch.Tensor:
    """Smooth ramps plus sharp-edged boxes plus noise: detail at every scale."""
    generator = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 64), indexing="ij")
    maps = torch.stack([0.5 * x + 0.3 * y, 0.6 * (1 - x) * y + 0.2, 0.4 * torch.sin(6 * x) ** 2 + 0.1])
    maps[:, 10:30, 20:40] += 0.3
    return (maps + 0.05 * torch.rand(maps.shape, generator=generator)).clamp(0, 1)


def test_level_zero_is_the_identity() -> None:
    depth = depth_maps()
    assert torch.equal(structure_level(depth, 0), depth)


def test_detail_falls_monotonically_with_the_level_and_the_range_is_kept() -> None:
    depth = depth_maps()
    energies = [laplacian_energy(structure_level(depth, t_s)) for t_s in range(7)]
    for finer, coarser in zip(energies, energies[1:]):
        assert (coarser <= finer + 1e-7).all()
    assert (energies[3] < 0.25 * energies[0]).all()
    for t_s in range(7):
        out = structure_level(depth, t_s)
        assert out.shape == depth.shape and out.min() >= 0 and out.max() <= 1


def test_each_frame_is_degraded_alone() -> None:
    depth = depth_maps()
    alone = structure_level(depth[1:2], 3)
    torch.testing.assert_close(structure_level(depth, 3)[1:2], alone)


def test_a_negative_level_is_refused() -> None:
    with pytest.raises(ValueError, match="t_s must be >= 0"):
        structure_level(depth_maps(), -1)


def test_temporal_guidance_endpoints() -> None:
    generator = torch.Generator().manual_seed(1)
    uncond, image, video = (torch.randn(4, 4, 8, 8, generator=generator) for _ in range(3))
    per_frame = uncond + 7.5 * (image - uncond)
    torch.testing.assert_close(temporal_guidance(uncond, image, video, omega=7.5, omega_t=0.0), per_frame)
    torch.testing.assert_close(temporal_guidance(uncond, image, video, omega=1.0, omega_t=1.0), video)
    # Identical image- and video-mode predictions make the temporal term vanish for any omega_t.
    torch.testing.assert_close(temporal_guidance(uncond, image, image, omega=3.0, omega_t=2.0), uncond + 3.0 * (image - uncond))
