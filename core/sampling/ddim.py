"""Deterministic DDIM denoising (eta = 0, epsilon prediction) and classifier-free guidance.

Contract: one denoising step takes the latent ``z_t`` at timestep ``t`` and the model's noise
prediction ``eps`` and returns the latent at ``t_prev = t - N/T`` (``N`` training timesteps, ``T``
inference steps), following the deterministic DDIM update of Song et al. 2021, "Denoising
Diffusion Implicit Models", §4.1 eq. (12) with sigma_t = 0: predict x0 from ``z_t`` and ``eps``,
then re-noise it to the previous level with the same ``eps``. When ``t_prev < 0`` the target level
is the scheduler's ``final_alpha_cumprod`` (``abar_0`` for Stable Diffusion, whose config has
``set_alpha_to_one=False``), exactly as diffusers' ``DDIMScheduler.step`` does. The step is a pure
function of the scheduler's ``alphas_cumprod``: it never calls ``set_timesteps`` on the caller's
scheduler and keeps no state, so it is the exact algebraic inverse of
``core.inversion.ddim.ddim_inversion_step`` at the same ``t`` when ``eps`` is the same.

Classifier-free guidance follows Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", §3.2
eq. (6), written in the Stable Diffusion form ``eps_u + w (eps_c - eps_u)``.
"""

# Notation (paper symbol -> variable):
#   abar_t       -> alpha_prod_t       alphas_cumprod[t]
#   abar_{t'}    -> alpha_prod_prev    alphas_cumprod[t - N/T], or final_alpha_cumprod when negative
#   N/T          -> step_ratio         num_train_timesteps // num_steps (diffusers' integer rule)
#   eps_theta    -> eps
#   z_t, z_{t'}  -> latents, latents_prev
#   w            -> scale              guidance scale (1 = conditional only, 7.5 for SD)

from __future__ import annotations

import copy
import math

import torch
from diffusers import DDIMScheduler


def denoising_timesteps(scheduler: DDIMScheduler, num_steps: int) -> torch.Tensor:
    """The scheduler's timesteps for ``num_steps`` steps, noisiest first.

    Computed on a copy, so the caller's scheduler is left as it was.

    Returns:
        ``(num_steps,)`` int64, descending; ``[981, 961, ..., 1]`` for 50 steps with the SD
        config (``timestep_spacing="leading"``, ``steps_offset=1``).
    """
    _check_scheduler(scheduler, num_steps)
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(num_steps)
    return probe.timesteps.detach().to("cpu", torch.int64).clone()


def step_alphas(scheduler: DDIMScheduler, t: int | torch.Tensor, num_steps: int) -> tuple[float, float]:
    """``(abar_t, abar_prev)`` for a step at ``t`` of a ``num_steps`` schedule, as Python floats.

    ``abar_prev`` is ``alphas_cumprod[t - N // num_steps]``, or ``final_alpha_cumprod`` when that
    index is negative. Shared by the denoising and the inversion step so the two use the very same
    noise levels.
    """
    _check_scheduler(scheduler, num_steps)
    t = int(t)
    num_train = scheduler.config.num_train_timesteps
    if not 0 <= t < num_train:
        raise ValueError(f"timestep {t} is outside [0, {num_train})")
    t_prev = t - num_train // num_steps
    alpha_prod_t = float(scheduler.alphas_cumprod[t])
    alpha_prod_prev = float(scheduler.alphas_cumprod[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod)
    return alpha_prod_t, alpha_prod_prev


def ddim_denoise_step(
    eps: torch.Tensor,
    t: int | torch.Tensor,
    latents: torch.Tensor,
    scheduler: DDIMScheduler,
    num_steps: int,
) -> torch.Tensor:
    """One deterministic DDIM step from ``t`` to ``t - N/T``.

    Args:
        eps: Noise prediction at ``(latents, t)``, same shape as ``latents``.
        t: The current timestep (an element of :func:`denoising_timesteps`).
        latents: ``z_t``, any shape, e.g. ``(F, 4, H/8, W/8)``.
        scheduler: Supplies ``alphas_cumprod`` and ``final_alpha_cumprod``; not mutated.
        num_steps: Number of inference steps ``T`` of the schedule ``t`` belongs to.

    Returns:
        ``z_{t_prev}``, same shape and dtype as ``latents``.
    """
    alpha_prod_t, alpha_prod_prev = step_alphas(scheduler, t, num_steps)
    return ddim_renoise(latents, eps, alpha_from=alpha_prod_t, alpha_to=alpha_prod_prev)


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """``eps_uncond + scale * (eps_cond - eps_uncond)``; ``scale = 1`` returns ``eps_cond``."""
    if eps_uncond.shape != eps_cond.shape:
        shapes = f"unconditional {tuple(eps_uncond.shape)}, conditional {tuple(eps_cond.shape)}"
        raise ValueError(f"eps shapes differ: {shapes}")
    return eps_uncond + scale * (eps_cond - eps_uncond)


def ddim_renoise(latents: torch.Tensor, eps: torch.Tensor, *, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """Move ``latents`` from level ``alpha_from`` to ``alpha_to`` along ``eps`` (DDIM eq. 12, sigma = 0).

    Both directions go through here: denoising lowers the noise level, inversion raises it.

    ``x0 = (z - sqrt(1 - a_from) eps) / sqrt(a_from)`` and ``z' = sqrt(a_to) x0 + sqrt(1 - a_to) eps``
    are folded into ``z' = c_z z + c_eps eps`` with the coefficients in float64, so a step and its
    reverse (levels swapped) compose to the identity up to one rounding of the latent dtype.
    """
    if eps.shape != latents.shape:
        raise ValueError(f"eps shape {tuple(eps.shape)} does not match latents shape {tuple(latents.shape)}")
    ratio = math.sqrt(alpha_to / alpha_from)
    c_z = ratio
    c_eps = math.sqrt(1.0 - alpha_to) - ratio * math.sqrt(1.0 - alpha_from)
    return c_z * latents + c_eps * eps.to(latents.dtype)


def _check_scheduler(scheduler: DDIMScheduler, num_steps: int) -> None:
    num_train = scheduler.config.num_train_timesteps
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"num_steps must be in [1, {num_train}]; got {num_steps}")
    prediction = scheduler.config.prediction_type
    if prediction != "epsilon":
        raise ValueError(f"DDIM here expects an epsilon-prediction scheduler; its prediction_type is {prediction!r}")
