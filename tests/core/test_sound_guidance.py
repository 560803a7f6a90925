"""Soundini's guidance losses (methods.md 5.8: items 2 and 6, and the signs the sampler relies on)."""

from __future__ import annotations

import pytest
import torch

from reelflow.core.guidance.sound import (
    background_l1,
    direction_loss,
    flow_loss,
    ramp,
    range_loss,
    sound_loss,
)


def test_the_flow_loss_and_its_gradient_vanish_for_identical_frames_with_zero_flow() -> None:
    x = torch.randn(1, 3, 16, 16).expand(3, -1, -1, -1).clone().requires_grad_(True)
    zero, mask = torch.zeros(2, 2, 16, 16), torch.ones(3, 1, 16, 16)
    loss = flow_loss(x, zero, zero, mask).sum()
    loss.backward()
    assert loss.item() == 0.0 and x.grad is not None and not x.grad.any()


def test_the_flow_loss_is_symmetric_under_swapping_frames_and_flows() -> None:
    generator = torch.Generator().manual_seed(0)
    x, forward, backward = torch.randn(2, 3, 12, 12, generator=generator), torch.randn(1, 2, 12, 12, generator=generator), torch.randn(1, 2, 12, 12, generator=generator)
    mask = torch.ones(2, 1, 12, 12)
    torch.testing.assert_close(flow_loss(x, forward, backward, mask), flow_loss(x.flip(0), backward, forward, mask))


def test_the_flow_loss_sees_motion_the_flow_explains_as_none_and_ignores_occluded_or_unmasked_pixels() -> None:
    first = torch.randn(1, 3, 16, 16)
    second = torch.roll(first, shifts=2, dims=3)  # everything moves 2 pixels right
    forward, backward = torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16, 16)
    forward[:, 0], backward[:, 0] = 2.0, -2.0
    second[..., 6:9, 6:9] = 5.0  # something appears in the second frame that the first does not have
    x, mask = torch.cat([first, second]), torch.ones(2, 1, 16, 16)
    occluded_forward, occluded_backward = torch.zeros(1, 16, 16, dtype=torch.bool), torch.zeros(1, 16, 16, dtype=torch.bool)
    occluded_forward[..., 6:9, 4:7], occluded_backward[..., 6:9, 6:9] = True, True  # where it lands, both ways
    assert flow_loss(x, forward, backward, mask).item() > 0.1  # unexplained
    explained = flow_loss(x, forward, backward, mask, occluded_forward, occluded_backward)
    assert explained.item() == pytest.approx(0.0, abs=1e-12)
    assert flow_loss(x, forward, backward, torch.zeros_like(mask)).item() == 0.0


def test_the_ramp_rises_from_near_zero_to_full_weight_over_fifty_steps() -> None:
    assert ramp(0) == pytest.approx(0.02) and ramp(24) == pytest.approx(0.5) and ramp(49) == ramp(80) == 1.0
    assert all(ramp(i) <= ramp(i + 1) for i in range(60))


def test_the_sound_losses_reward_agreement_and_direction() -> None:
    audio = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sound_loss(audio * 3.0, audio), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(sound_loss(-audio, audio), torch.full((4,), 2.0), atol=1e-6, rtol=0)
    image = torch.cumsum(audio, 0)
    torch.testing.assert_close(direction_loss(image * 2.0, image), torch.zeros(3), atol=1e-6, rtol=0)  # same changes
    assert direction_loss(-image, image).min().item() > 1.0  # the opposite changes
    assert not direction_loss(image, torch.ones(4, 8)).any()  # a steady sound asks for no change


def test_background_and_range_losses() -> None:
    source, mask = torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1.0
    x = source.clone()
    x[..., :2] = 5.0  # inside the mask: free to change
    assert background_l1(x, source, mask).item() == 0.0
    x[..., 3] = 1.0
    assert background_l1(x, source, mask).item() == pytest.approx(0.25)
    assert range_loss(torch.tensor([[0.5, -1.0, 1.5, -3.0]])).item() == pytest.approx((0.25 + 4.0) / 4)
