"""DDIM inversion as FateZero codes it: walk a clean latent ``z_0`` up to ``z_T`` without guidance.

Contract: FateZero (Qi et al. 2023, "FateZero: Fusing Attentions for Zero-shot Text-based Video
Editing", §3.1 and §3.2) inverts the source video with deterministic DDIM run backwards (Song et
al. 2021, §4.1 eq. (12) with sigma_t = 0) using the source prompt only (guidance scale 1), and
records the attention maps of every inversion step. Inversion step ``k`` walks the denoising
schedule in ascending order, ``t = (1, 21, ..., 981)[k]`` for 50 steps, and queries the UNet at
that NEXT (noisier) timestep ``t`` on the CURRENT latent ``z_k``; then it moves ``z_k`` from level
``abar[t - N/T]`` (``final_alpha_cumprod`` when the index is negative) to level ``abar[t]``. This is
``core.sampling.ddim.ddim_denoise_step`` at the same ``t`` with the two levels swapped, so with an
equal ``eps`` the two are exact algebraic inverses; with a real UNet they differ only because the
inversion evaluates ``eps`` on ``z_k`` rather than on ``z_{k+1}``, an error that shrinks as ``T``
grows. Edit step ``i`` of a later ``T``-step denoising pass runs at the timestep of inversion step
``T - 1 - i``, which is how the caller pairs stored maps with edit steps.
"""

# Notation (paper / FateZero code symbol -> variable):
#   z_k, z_{k+1}   -> latents before / after inversion step k (z_0 clean, z_T returned)
#   t              -> t, the k-th ascending timestep ("next" timestep in FateZero's code)
#   abar[t - N/T]  -> alpha_prod_prev (final_alpha_cumprod when t - N/T < 0)
#   abar[t]        -> alpha_prod_t   ("a_next" in the digest, methods.md 1.3)
#   eps_theta(z_k, t, c_src) -> unet_fn(latents, t, k)
# Follows FateZero's p2p_ddim_spatial_temporal.py ddim_clean2noisy_loop / next_clean2noise_step (methods.md 1.3).

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler

from reelflow.core.sampling.ddim import ddim_renoise, denoising_timesteps, step_alphas

UnetFn = Callable[[torch.Tensor, int, int], torch.Tensor]
"""``unet_fn(latents, t, step_index) -> eps``: the caller binds the UNet, the source text
embeddings and the attention controller's step; ``latents`` and ``eps`` are ``(F, 4, h, w)``."""

OnStep = Callable[[int, int, torch.Tensor], None]
"""``on_step(step_index, t, latents_after)``: inversion step ``step_index`` ran at ``t`` and produced
``latents_after`` (``z_{step_index + 1}``)."""


def inversion_timesteps(scheduler: DDIMScheduler, num_steps: int) -> torch.Tensor:
    """The denoising timesteps reversed: ``(num_steps,)`` int64, ascending.

    ``[1, 21, ..., 981]`` for 50 steps with the SD config. The caller's scheduler is not mutated.
    """
    return denoising_timesteps(scheduler, num_steps).flip(0)


def ddim_inversion_step(
    eps: torch.Tensor,
    t: int | torch.Tensor,
    latents: torch.Tensor,
    scheduler: DDIMScheduler,
    num_steps: int,
) -> torch.Tensor:
    """One inversion step: move ``latents`` from level ``abar[t - N/T]`` up to level ``abar[t]``.

    Args:
        eps: Noise prediction, FateZero-style ``eps_theta(latents, t)``; same shape as ``latents``.
        t: The step's timestep (an element of :func:`inversion_timesteps`).
        latents: ``z_k``, any shape, e.g. ``(F, 4, H/8, W/8)``.
        scheduler: Supplies ``alphas_cumprod`` and ``final_alpha_cumprod``; not mutated.
        num_steps: Number of inference steps ``T``.

    Returns:
        ``z_{k+1}``, same shape and dtype as ``latents``.
    """
    alpha_prod_t, alpha_prod_prev = step_alphas(scheduler, t, num_steps)
    return ddim_renoise(latents, eps, alpha_from=alpha_prod_prev, alpha_to=alpha_prod_t)


def ddim_invert(
    unet_fn: UnetFn,
    latents: torch.Tensor,
    scheduler: DDIMScheduler,
    num_steps: int,
    *,
    on_step: OnStep | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Invert clean latents ``z_0`` to ``z_T`` with ``num_steps`` unguided DDIM steps.

    With ``start = k`` the walk resumes from a stored ``z_k`` (given as ``latents``) and runs steps
    ``k, ..., T - 1`` only; the result equals the uninterrupted walk's, since each step depends on its
    input latent alone.

    Args:
        unet_fn: ``unet_fn(latents, t, step_index) -> eps``, called once per step, in order
            ``step_index = 0, ..., num_steps - 1`` with ascending ``t``.
        latents: ``z_0``, ``(F, 4, h, w)``; not modified.
        scheduler: A ``DDIMScheduler`` (epsilon prediction); not mutated.
        num_steps: Number of inversion steps ``T``; use the editing pass's step count so that
            every edit step has a stored step at the same timestep.
        on_step: Called after each step with ``(step_index, t, latents_after)`` so the caller can
            stream ``z_{k+1}`` and close the step's attention maps.
        start: The first step to run; ``latents`` is then ``z_start``.

    Returns:
        ``z_T``, ``(F, 4, h, w)``, same dtype and device as ``latents``.
    """
    # 1. validate
    if latents.ndim != 4:
        raise ValueError(f"latents must be (F, C, h, w); got shape {tuple(latents.shape)}")
    if not 0 <= start <= num_steps:
        raise ValueError(f"start must be in [0, {num_steps}]; got {start}")
    # 2. timesteps (ascending; raises on a bad step count or a non-epsilon scheduler)
    timesteps = inversion_timesteps(scheduler, num_steps).tolist()
    # 3. loop: eps at the next timestep on the current latent, then one step up
    with torch.no_grad():
        for step_index, t in enumerate(timesteps[start:], start=start):
            eps = unet_fn(latents, t, step_index)
            latents = ddim_inversion_step(eps, t, latents, scheduler, num_steps)
            if on_step is not None:
                on_step(step_index, t, latents)
    return latents
