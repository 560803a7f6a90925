"""Soundini's sampler (Lee et al. 2023; methods.md 5.4): DDIM steps whose noise prediction is shifted by the
gradient of the guidance losses, evaluated on each step's denoised estimate, and blending with the
noised source outside the region. Two backbones: a pixel-space model (the reference's ADM as a
diffusers ``UNet2DModel``; ``z`` are the frames in [-1, 1], ``vae`` is None) or a latent one (SD 1.5;
``z`` are latents, decoded by the VAE for the losses).

One step from ``z_t`` (``(F, C, h, w)``, frames ``[start, stop)`` of the clip, in chunks):

1. ``eps = unet(z_t, t)`` (unconditional: SD's empty prompt; ADM's first ``C`` output channels, the rest
   being its learned variance) and ``x0 = (z_t - sqrt(1 - abar) eps) / sqrt(abar)``;
2. the estimate the losses see is Blended Diffusion's ``x_in = f x0 + (1 - f) z_t`` with
   ``f = sqrt(1 - abar)``, decoded by the VAE (if any) to frames in [-1, 1];
3. ``L = losses(frames)`` (core.guidance.sound: sound, direction, flow, background, range), and the
   classifier-guidance shift ``eps' = eps + sqrt(1 - abar) grad_{z_t} L`` (ADM's ``condition_mean``
   in DDIM's epsilon form: descending ``L`` is ascending ``log p(y | z_t)``);
4. the DDIM step with ``eps'``, then ``z_{t-1} <- M z_{t-1} + (1 - M) q(z_src, t-1, n)``: outside the
   region, the source noised to the level the step reached (the prototype noises it to ``t``, one
   level too high, methods.md 5.4).

The gradient flows through the UNet (and the decoder), as the reference's does through its pixel
model. Memory is bounded by the chunk: each chunk is guided on its own frames plus the previous
chunk's last frame (its denoised estimate at this step, held fixed), so the losses that link
neighbours (flow, direction) see every pair, as the prototype's sliding window of pairs does; the
losses are sums of per-frame terms, so a frame is pulled as hard whichever chunk it falls in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from reelflow.core.editing.gen1 import sdedit_start
from reelflow.core.sampling.ddim import ddim_denoise_step, step_alphas
from reelflow.core.vae import latent_scale

Losses = Callable[[torch.Tensor, slice, bool, int], torch.Tensor]
"""``losses(frames (n, 3, H, W) in [-1, 1], which clip frames they are, whether the first is the fixed neighbour
from the previous chunk, step index) -> scalar``."""


@dataclass(frozen=True)
class Region:
    """The region to edit on the model's grid, ``(F, 1, h, w)`` in {0, 1}, and the source there ``(F, C, h, w)``
    with the noise that puts them on each level (one noise for every frame by default, as the prototype)."""

    mask: torch.Tensor
    source: torch.Tensor
    noise: torch.Tensor

    def noised(self, frames: slice, alpha_prod: float) -> torch.Tensor:
        """The source at the level of ``alpha_prod``: ``sqrt(abar) z_src + sqrt(1 - abar) n``."""
        return sdedit_start(self.source[frames], self.noise[frames], alpha_prod)

    def blend(self, z: torch.Tensor, frames: slice, alpha_prod: float) -> torch.Tensor:
        mask = self.mask[frames]
        return mask * z + (1.0 - mask) * self.noised(frames, alpha_prod)


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Frames from SD latents, differentiable (``core.vae.decode_latents`` is not, and clamps); a pixel model's ``z``
    (no ``vae``) are the frames."""
    if vae is None:
        return latents
    scale, shift = latent_scale(vae)
    return vae.decode(latents / scale + shift).sample


def predict_noise(unet: Any, z: torch.Tensor, t: int, embeds: torch.Tensor | None) -> torch.Tensor:
    """``eps`` for ``z``: a text-conditioned UNet with ``embeds`` (one prompt for every frame), or an unconditional
    one (``embeds`` None) whose extra output channels, ADM's learned variance, are dropped."""
    if embeds is None:
        return unet(z, t).sample[:, : z.shape[1]]
    return unet(z, t, encoder_hidden_states=embeds.to(unet.device, unet.dtype).expand(len(z), -1, -1)).sample


def guided_step(
    unet: Any, vae: Any, z: torch.Tensor, t: int, embeds: torch.Tensor | None, scheduler: Any, losses: Losses, frames: slice,
    step: int, anchor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The guided epsilon for ``z`` (frames ``frames`` of the clip) at timestep ``t``, and the denoised estimate the
    losses saw (detached). ``anchor`` ``(1, C, h, w)`` is the previous frame's estimate at this step, decoded with
    the chunk for the losses that link neighbouring frames and held fixed."""
    abar = float(scheduler.alphas_cumprod[t])
    with torch.enable_grad():
        z = z.detach().to(unet.device, unet.dtype).requires_grad_(True)
        eps = predict_noise(unet, z, t, embeds)
        x0 = (z - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)
        fac = math.sqrt(1.0 - abar)
        estimate = fac * x0 + (1.0 - fac) * z
        if anchor is not None:
            estimate = torch.cat([anchor.to(estimate), estimate])
        pixels = decode(vae, estimate if vae is None else estimate.to(vae.device, vae.dtype)).float()
        seen = slice(frames.start - (anchor is not None), frames.stop)
        loss = losses(pixels, seen, anchor is not None, step)
        grad = torch.autograd.grad(loss, z)[0] if loss.requires_grad else torch.zeros_like(z)
    own = estimate[1:] if anchor is not None else estimate
    return (eps.detach().float() + math.sqrt(1.0 - abar) * grad.float()).cpu(), own.detach().float().cpu()


def soundini_denoise(
    unet: Any, vae: Any, z: torch.Tensor, embeds: torch.Tensor | None, scheduler: Any, num_steps: int, timesteps: torch.Tensor,
    region: Region, losses: Losses, *, chunk: int = 4, on_step: Callable[[int, torch.Tensor], None] | None = None,
    first_step: int = 0,
) -> torch.Tensor:  # fmt: skip
    """Denoise the whole clip's ``z`` ``(F, C, h, w)`` over ``timesteps`` (noisiest first), ``chunk`` frames at a time.
    ``first_step`` is the index of ``timesteps[0]`` in the edit's schedule (a resumed edit), which the losses see."""
    count = z.shape[0]
    for i, t in enumerate(timesteps):
        alpha_prev = step_alphas(scheduler, t, num_steps)[1]
        updated, anchor = torch.empty_like(z), None
        for start in range(0, count, chunk):
            frames = slice(start, min(start + chunk, count))
            eps, estimate = guided_step(unet, vae, z[frames], int(t), embeds, scheduler, losses, frames, first_step + i, anchor)
            anchor = estimate[-1:]
            stepped = ddim_denoise_step(eps, t, z[frames], scheduler, num_steps)
            updated[frames] = region.blend(stepped, frames, alpha_prev)
        z = updated
        if on_step is not None:
            on_step(i, z)
    return z

