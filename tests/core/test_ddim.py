"""DDIM denoising and FateZero's DDIM inversion: exact inverses, diffusers parity, step bookkeeping."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel

from reelflow.core.inversion.ddim import ddim_invert, ddim_inversion_step, inversion_timesteps
from reelflow.core.sampling.ddim import (
    classifier_free_guidance,
    ddim_denoise_step,
    denoising_timesteps,
    step_alphas,
)
from reelflow.core.tiny import sd15_scheduler
from reelflow.core.tiny import tiny_unet as build_tiny_unet

F = 2


@pytest.fixture
def scheduler() -> DDIMScheduler:
    return sd15_scheduler()


@pytest.fixture
def z0() -> torch.Tensor:
    return torch.randn(F, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def _denoise(unet_fn, latents: torch.Tensor, scheduler: DDIMScheduler, num_steps: int) -> torch.Tensor:
    with torch.no_grad():
        for t in denoising_timesteps(scheduler, num_steps).tolist():
            latents = ddim_denoise_step(unet_fn(latents, t), t, latents, scheduler, num_steps)
    return latents


# --- timesteps ---------------------------------------------------------------------------------


def test_inversion_timesteps_are_the_scheduler_timesteps_reversed(scheduler: DDIMScheduler) -> None:
    reference = DDIMScheduler.from_config(scheduler.config)
    reference.set_timesteps(50)

    ascending = inversion_timesteps(scheduler, 50)

    assert ascending.tolist() == list(range(1, 1000, 20))
    assert torch.equal(ascending, reference.timesteps.flip(0))
    assert torch.equal(denoising_timesteps(scheduler, 50), reference.timesteps)
    assert scheduler.num_inference_steps is None  # computed on a copy


def test_last_denoising_step_lands_on_final_alpha_cumprod(scheduler: DDIMScheduler) -> None:
    alpha_t, alpha_prev = step_alphas(scheduler, 1, 50)
    assert alpha_t == pytest.approx(float(scheduler.alphas_cumprod[1]))
    assert alpha_prev == pytest.approx(float(scheduler.final_alpha_cumprod))
    assert alpha_prev == pytest.approx(float(scheduler.alphas_cumprod[0]))  # set_alpha_to_one=False

    _, alpha_prev = step_alphas(scheduler, 981, 50)
    assert alpha_prev == pytest.approx(float(scheduler.alphas_cumprod[961]))


def test_bad_step_count_and_prediction_type_are_refused(scheduler: DDIMScheduler) -> None:
    with pytest.raises(ValueError, match="num_steps"):
        inversion_timesteps(scheduler, 0)
    v_scheduler = DDIMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="v_prediction"):
        denoising_timesteps(v_scheduler, 10)


# --- single steps ------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 21, 501, 981])
def test_denoise_step_matches_diffusers_ddim_step(scheduler: DDIMScheduler, z0: torch.Tensor, t: int) -> None:
    eps = torch.randn_like(z0)
    reference = DDIMScheduler.from_config(scheduler.config)
    reference.set_timesteps(50)

    expected = reference.step(eps, t, z0, eta=0.0).prev_sample

    torch.testing.assert_close(ddim_denoise_step(eps, t, z0, scheduler, 50), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("t", [1, 21, 501, 981])
def test_inversion_step_matches_diffusers_ddim_inverse_step(scheduler: DDIMScheduler, z0: torch.Tensor, t: int) -> None:
    eps = torch.randn_like(z0)
    reference = DDIMInverseScheduler.from_config(scheduler.config)
    reference.set_timesteps(50)

    expected = reference.step(eps, t, z0).prev_sample

    torch.testing.assert_close(ddim_inversion_step(eps, t, z0, scheduler, 50), expected, atol=2e-6, rtol=1e-5)


def test_denoise_step_undoes_inversion_step_with_equal_eps(scheduler: DDIMScheduler, z0: torch.Tensor) -> None:
    eps = torch.randn_like(z0)
    for t in (1, 481, 981):
        up = ddim_inversion_step(eps, t, z0, scheduler, 50)
        torch.testing.assert_close(ddim_denoise_step(eps, t, up, scheduler, 50), z0, atol=1e-5, rtol=0)
        assert not torch.allclose(up, z0, atol=1e-3)


def test_classifier_free_guidance_is_the_affine_combination() -> None:
    uncond, cond = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(classifier_free_guidance(uncond, cond, 1.0), cond)
    torch.testing.assert_close(classifier_free_guidance(uncond, cond, 0.0), uncond)
    torch.testing.assert_close(classifier_free_guidance(uncond, cond, 7.5), uncond + 7.5 * (cond - uncond))


# --- whole inversion ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [10, 50])
def test_constant_eps_inversion_then_denoising_reconstructs(
    scheduler: DDIMScheduler, z0: torch.Tensor, num_steps: int
) -> None:
    # eps independent of the latent: inversion and denoising see the same eps at every t, so the
    # round trip is exact. (An x0-oracle eps would pass even for a wrong inversion.)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))

    z_t = ddim_invert(lambda latents, t, k: eps, z0, scheduler, num_steps)
    reconstruction = _denoise(lambda latents, t: eps, z_t, scheduler, num_steps)

    assert (z_t - z0).abs().max() > 0.5
    torch.testing.assert_close(reconstruction, z0, atol=2e-5, rtol=0)


def test_unet_fn_and_on_step_see_each_step_in_order(scheduler: DDIMScheduler, z0: torch.Tensor) -> None:
    calls: list[tuple[int, int, bool]] = []
    after: list[tuple[int, int, torch.Tensor]] = []

    def unet_fn(latents: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
        calls.append((step_index, t, torch.is_grad_enabled()))
        return torch.full_like(latents, 0.1 * step_index)

    z_t = ddim_invert(unet_fn, z0, scheduler, 10, on_step=lambda k, t, z: after.append((k, t, z)))

    expected = [(k, t) for k, t in enumerate(inversion_timesteps(scheduler, 10).tolist())]
    assert [(k, t) for k, t, _ in calls] == expected
    assert not any(grad for _, _, grad in calls)
    assert [(k, t) for k, t, _ in after] == expected
    latents = z0
    for k, t, streamed in after:
        latents = ddim_inversion_step(torch.full_like(z0, 0.1 * k), t, latents, scheduler, 10)
        torch.testing.assert_close(streamed, latents)
    assert torch.equal(after[-1][2], z_t)


@pytest.fixture
def tiny_unet() -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_tiny_unet()
    return unet.eval()


def test_random_unet_reconstruction_error_shrinks_with_more_steps(
    tiny_unet: UNet2DConditionModel, scheduler: DDIMScheduler, z0: torch.Tensor
) -> None:
    # FateZero evaluates eps on z_k at the next timestep; the mismatch with eps(z_{k+1}) shrinks
    # with the step size. Below ~15 steps a random UNet's error is not yet in that regime.
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2)).expand(F, -1, -1)

    def eps(latents: torch.Tensor, t: int) -> torch.Tensor:
        return tiny_unet(latents, t, encoder_hidden_states=text).sample

    errors = []
    for num_steps in (15, 30, 60):
        z_t = ddim_invert(lambda latents, t, k: eps(latents, t), z0, scheduler, num_steps)
        reconstruction = _denoise(eps, z_t, scheduler, num_steps)
        errors.append(((reconstruction - z0).norm() / z0.norm()).item())

    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.75 * errors[0], errors
