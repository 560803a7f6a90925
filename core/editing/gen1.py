"""A zero-shot Gen-1: structure from depth, content from a prompt, temporal guidance between per-frame
and cross-frame predictions of one image UNet.

Gen-1 (Esser et al. 2023, "Structure and Content-Guided Video Synthesis with Diffusion Models") is
closed; this is its open counterpart (methods.md 4.2). Structure ``s`` is the clip's depth, degraded
to the structure level ``t_s`` (core.guidance.structure), given to the UNet either concatenated to
the latents (a depth UNet such as stable-diffusion-2-depth, 5 input channels) or through a depth
ControlNet. Content ``c`` conditions cross-attention: text, one CLIP image token (an image-variation
UNet), or text and a CLIP image embedding through an IP-Adapter (core.attention.ip_adapter). Every step makes three predictions: the
image mode (each frame alone) without and with content, and the video mode (self-attention also
reading an anchor frame, core.attention.processor) with content; core.guidance.temporal combines
them with ``omega`` and ``omega_t``. The video pass is skipped when ``omega_t = 0``.

Sampling is deterministic DDIM (core.sampling.ddim) from the source latents noised to the edit's
strength (SDEdit; Meng et al. 2022): ``z = sqrt(abar_t) z0 + sqrt(1 - abar_t) n``, or DDIM-inverted
to it under the same structure (:func:`gen1_invert`), which keeps more of the source. With a mask,
every step keeps the source's own trajectory outside it (latent blending, methods.md 3.5b):
``z <- M z + (1 - M) z_src(t)``.

Notation: ``z`` latents ``(F, 4, h, w)``; ``structure`` depth in ``[0, 1]`` ``(F, H, W)`` at frame size;
``embeds`` ``(2, L, D)`` (unconditional, conditional); ``image_embeds`` ``(2, 1, E)`` the same for an
IP-Adapter (zeros, then the reference's embedding); ``omega``, ``omega_t`` as in Gen-1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from reelflow.core.attention.ip_adapter import image_embed_kwargs
from reelflow.core.attention.processor import set_cross_frame, set_num_frames
from reelflow.core.guidance.temporal import temporal_guidance
from reelflow.core.inversion.ddim import ddim_inversion_step
from reelflow.core.sampling.ddim import ddim_denoise_step, denoising_timesteps, step_alphas

OnStep = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class Structure:
    """How depth reaches the UNet: ``concat`` (extra input channel) or ``controlnet`` (residuals)."""

    depth: torch.Tensor  # (F, H, W) in [0, 1] at frame size, or (F, h, w) on the latent grid; at its structure level
    controlnet: Any = None
    scale: float = 1.0  # the ControlNet's conditioning scale
    span: tuple[float, float] = (0.0, 1.0)  # the clip's depth range at this structure level

    def concat_channel(self, latent_size: tuple[int, int]) -> torch.Tensor:
        """``(F, 1, h, w)`` depth at latent size, the clip's range mapped to ``[-1, 1]``: Depth2Img's form, with one
        scale and shift for the whole clip instead of one per image, so the condition does not flicker."""
        small = self.depth[:, None].float()
        if tuple(small.shape[-2:]) != tuple(latent_size):
            small = F.interpolate(small, size=latent_size, mode="bicubic", align_corners=False)
        low, high = self.span
        return ((small - low) / max(high - low, 1e-6)).clamp(0.0, 1.0) * 2.0 - 1.0

    def control_image(self) -> torch.Tensor:
        """``(F, 3, H, W)`` depth image in ``[0, 1]``, the layout depth ControlNets were trained on."""
        return self.depth[:, None].float().expand(-1, 3, -1, -1)


@dataclass(frozen=True)
class Blend:
    """Latent blending outside a mask: ``mask`` ``(1, 1, h, w)`` (1: edit), and the source's latents at each
    level the edit reaches, ``source(step index, abar after the step) -> (F, 4, h, w)``."""

    mask: torch.Tensor
    source: Callable[[int, float], torch.Tensor]

    def __call__(self, z: torch.Tensor, index: int, alpha_prod: float) -> torch.Tensor:
        return self.mask * z + (1.0 - self.mask) * self.source(index, alpha_prod)


def sdedit_start(z0: torch.Tensor, noise: torch.Tensor, alpha_prod: float) -> torch.Tensor:
    """The source latents noised to the level the edit starts from (DDPM forward process)."""
    return math.sqrt(alpha_prod) * z0 + math.sqrt(1.0 - alpha_prod) * noise


def edit_timesteps(scheduler: Any, num_steps: int, strength: float) -> torch.Tensor:
    """The last ``int(num_steps * strength)`` timesteps of the schedule, noisiest first (an img2img edit)."""
    timesteps = denoising_timesteps(scheduler, num_steps)
    return timesteps[num_steps - min(int(num_steps * strength), num_steps) :]


def gen1_denoise(
    unet: Any,
    z: torch.Tensor,
    embeds: torch.Tensor,
    structure: Structure,
    scheduler: Any,
    num_steps: int,
    timesteps: torch.Tensor,
    *,
    omega: float,
    omega_t: float,
    blend: Blend | None = None,
    on_step: OnStep | None = None,
    image_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise ``z`` over ``timesteps`` (a tail of a ``num_steps`` DDIM schedule) with Gen-1's guidance.

    The UNet must carry ``FrameAttnProcessor`` on its self-attention layers (video mode); this
    switches them to image mode for the per-frame passes and back. With ``image_embeds`` it must
    carry an IP-Adapter too (:func:`~reelflow.core.attention.ip_adapter.ip_adapter`).
    """
    # 1. conditioning that does not change between steps
    frames = z.shape[0]
    device, dtype = unet.device, unet.dtype
    uncond, cond = (e.to(device, dtype).expand(frames, -1, -1) for e in embeds[:, None])
    images = image_embeds.repeat_interleave(frames, dim=0) if image_embeds is not None else None  # (2F, 1, E)
    concat = structure.concat_channel(tuple(z.shape[-2:])).to(device, dtype) if structure.controlnet is None else None
    control = structure.control_image().to(device, dtype) if structure.controlnet is not None else None
    set_num_frames(unet, frames)
    # 2. the loop
    for i, t in enumerate(timesteps):
        both = torch.cat([uncond, cond])
        residuals = _control(structure, z, int(t), both, concat, control)
        image = _predict(unet, z, int(t), both, concat, residuals, images, cross_frame=False)
        eps_uncond, eps_image = image.chunk(2)
        eps_video = eps_image
        if omega_t != 0.0:  # the ControlNet's attention stays per frame: its conditional half serves again
            video_images = images[frames:] if images is not None else None
            eps_video = _predict(unet, z, int(t), cond, concat, _second_half(residuals), video_images, cross_frame=True)
        eps = temporal_guidance(eps_uncond, eps_image, eps_video, omega=omega, omega_t=omega_t)
        z = ddim_denoise_step(eps, t, z, scheduler, num_steps)
        if blend is not None:
            z = blend(z, i, step_alphas(scheduler, t, num_steps)[1])
        if on_step is not None:
            on_step(i, int(t), z)
    set_cross_frame(unet, True)
    return z


def gen1_invert(
    unet: Any, z0: torch.Tensor, uncond: torch.Tensor, structure: Structure, scheduler: Any, num_steps: int,
    timesteps: torch.Tensor,
) -> list[torch.Tensor]:  # fmt: skip
    """DDIM-invert ``z0`` up the edit's ``timesteps`` (climbed in reverse) under the same structure, frame by
    frame and without content (``uncond`` ``(1, L, D)``). Returns the latents at every level, clean first."""
    frames = z0.shape[0]
    embeds = uncond.to(unet.device, unet.dtype).expand(frames, -1, -1)
    concat = structure.concat_channel(tuple(z0.shape[-2:])).to(unet.device, unet.dtype) if structure.controlnet is None else None
    control = structure.control_image().to(unet.device, unet.dtype) if structure.controlnet is not None else None
    levels = [z0]
    for t in timesteps.flip(0):
        residuals = _control(structure, levels[-1], int(t), embeds, concat, control)
        eps = _predict(unet, levels[-1], int(t), embeds, concat, residuals, None, cross_frame=False)
        levels.append(ddim_inversion_step(eps, t, levels[-1], scheduler, num_steps))
    set_cross_frame(unet, True)
    return levels


def _inputs(z: torch.Tensor, copies: int, concat: torch.Tensor | None, like: Any) -> torch.Tensor:
    sample = z.to(like.device, like.dtype).repeat(copies, 1, 1, 1)
    return torch.cat([sample, concat.repeat(copies, 1, 1, 1)], dim=1) if concat is not None else sample


def _control(
    structure: Structure, z: torch.Tensor, t: int, embeds: torch.Tensor, concat: torch.Tensor | None,
    control: torch.Tensor | None,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor] | None:  # fmt: skip
    """The ControlNet's residuals for ``z`` repeated once per row block of ``embeds`` (None without one)."""
    if control is None:
        return None
    copies = embeds.shape[0] // z.shape[0]
    with torch.inference_mode():
        down, mid = structure.controlnet(_inputs(z, copies, concat, structure.controlnet), t, encoder_hidden_states=embeds,
                                         controlnet_cond=control.repeat(copies, 1, 1, 1),
                                         conditioning_scale=structure.scale, return_dict=False)  # fmt: skip
    return tuple(down), mid


def _second_half(residuals: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None) -> Any:
    if residuals is None:
        return None
    return tuple(r.chunk(2)[1] for r in residuals[0]), residuals[1].chunk(2)[1]


def _predict(
    unet: Any, z: torch.Tensor, t: int, embeds: torch.Tensor, concat: torch.Tensor | None,
    residuals: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None, image_embeds: torch.Tensor | None, *,
    cross_frame: bool,
) -> torch.Tensor:  # fmt: skip
    """The UNet's noise prediction for ``z`` repeated once per row block of ``embeds``, in one mode (with an
    IP-Adapter's ``image_embeds``, one row per row of ``embeds``)."""
    extra = {"down_block_additional_residuals": residuals[0], "mid_block_additional_residual": residuals[1]} if residuals else {}
    extra |= image_embed_kwargs(unet, image_embeds)
    set_cross_frame(unet, cross_frame)
    with torch.inference_mode():
        return unet(_inputs(z, embeds.shape[0] // z.shape[0], concat, unet), t, encoder_hidden_states=embeds, **extra).sample.float().cpu()
