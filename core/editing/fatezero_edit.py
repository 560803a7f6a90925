"""FateZero's two passes on a UNet: the inversion that records attention and the edit that fuses it.

Contract: FateZero (Qi et al. 2023, "FateZero: Fusing Attentions for Zero-shot Text-based Video
Editing", §3.1-3.2) inverts the source clip with unguided DDIM under the source prompt while a
``RecordingController`` hands the attention maps of every recorded step to a sink (methods.md 1.3,
1.4); then, from the inverted ``z_T``, it denoises under the target prompt with classifier-free
guidance while a ``FusionController`` fuses the maps recorded at the same timestep into the
conditional half of the batch (methods.md 1.6-1.8). Optionally a ``LatentBlender`` keeps the
inversion's latents outside the edited object on the middle steps (methods.md 1.9).

Both passes are numerics on a given UNet and never touch storage: the caller installs the
``FrameAttnProcessor``s that route attention through the controller
(``core.attention.processor.install_frame_processors``, same frame keys for both passes, since the
stored maps must come from the same layers in the same order) and restores them afterwards; it
receives every step through ``on_step`` (to stream latents, to report progress) and hands the
inversion's latents to the blender as a callable.
"""

# Notation (paper / FateZero code symbol -> variable):
#   T                  -> num_steps
#   i                  -> edit step (0 = noisiest); k = T-1-i the inversion step at the same timestep
#   z_k                -> latents after inversion step k-1 (z_0 clean, z_T the edit's start)
#   c_src, c_edt, c_u  -> source / target / negative prompt embeddings
#   w                  -> guidance_scale
#   eps_u, eps_c       -> eps_uncond, eps_cond
#   M (latent blend)   -> FusionController.latent_mask, 1 = keep the edit

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler

from reelflow.core.attention.processor import set_num_frames
from reelflow.core.editing.fatezero import FusionController, RecordingController
from reelflow.core.inversion.ddim import OnStep, ddim_invert
from reelflow.core.sampling.ddim import classifier_free_guidance, ddim_denoise_step, denoising_timesteps

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

InversionLatent = Callable[[int], torch.Tensor]
"""``inversion_latent(k) -> z_k``, ``(F, 4, h, w)``: the inversion's latent after ``k`` steps."""
StepBlender = Callable[[int, torch.Tensor], torch.Tensor]
"""``blender(i, latents) -> latents``: called after edit step ``i`` with its denoised latents."""


class LatentBlender:
    """FateZero's optional latent blending (methods.md 1.9): ``z <- z_inv + M * (z - z_inv)`` inside
    the plan's latent window, where ``M`` unites the source and target blend-word masks
    (``FusionController.latent_mask``): 1 keeps the edit, 0 takes the inversion's latent.

    Edit step ``i`` runs at the timestep of inversion step ``T-1-i`` and lands on the noise level of
    ``z_{T-1-i}``, so it blends with ``inversion_latent(T-1-i)``: the matching noise level.
    FateZero's code (``latents_store[T - (i+1)]`` in its step callback) uses the inverted latent one
    level noisier; here the matching one is used deliberately. Outside the window the latents pass
    through untouched.
    """

    def __init__(self, controller: FusionController, inversion_latent: InversionLatent) -> None:
        """``controller`` supplies the plan's window and the mask of the current step (call it after
        ``controller.begin_step(i)``); ``inversion_latent(k)`` returns ``z_k``."""
        self.controller = controller
        self.inversion_latent = inversion_latent

    def __call__(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        """Blend edit step ``step``'s denoised ``latents`` ``(F, 4, h, w)``; same shape and dtype."""
        plan = self.controller.plan
        if plan.latent_window is None or not plan.latent_window[step]:
            return latents
        h, w = latents.shape[-2:]
        mask = self.controller.latent_mask(h * w).reshape(latents.shape[0], 1, h, w).to(latents)
        reference = self.inversion_latent(plan.num_steps - 1 - step).to(latents)
        return reference + mask * (latents - reference)


def fatezero_invert(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    scheduler: DDIMScheduler,
    num_steps: int,
    recorder: RecordingController,
    *,
    on_step: OnStep | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Invert ``z_0`` to ``z_T`` under the source prompt, recording attention (§3.1; methods.md 1.3).

    Unguided (guidance scale 1, as FateZero): every frame is conditioned on the source prompt. The
    recorder is told the inversion step before each UNet call, so its sink files the maps by step.

    Args:
        unet: Carries ``FrameAttnProcessor``s whose controller is ``recorder``.
        latents: ``z_0``, ``(F, 4, h, w)``.
        embeddings: ``(1, L, D)``, the source prompt's text embeddings.
        scheduler: A DDIM scheduler (epsilon prediction); not mutated.
        num_steps: ``T``; the edits use the same count.
        recorder: Records the maps of its steps.
        on_step: ``on_step(k, t, z_{k+1})`` after each inversion step.
        start: Resume at step ``start`` from a stored ``z_start`` given as ``latents``.

    Returns:
        ``z_T``, ``(F, 4, h, w)``, ``latents``' dtype, on the UNet's device.
    """
    # 1. validate
    if embeddings.ndim != 3 or embeddings.shape[0] != 1:
        raise ValueError(f"embeddings must be one prompt's (1, L, D); got shape {tuple(embeddings.shape)}")
    # 2. conditioning: the source prompt for every frame
    frames = latents.shape[0]
    context = embeddings.to(unet.dtype).expand(frames, -1, -1)

    # 3. loop (in ddim_invert): eps at the next timestep on the current latent, recorded
    def unet_fn(z: torch.Tensor, t: int, k: int) -> torch.Tensor:
        recorder.step = k
        set_num_frames(unet, frames)
        return unet(z.to(unet.device, unet.dtype), t, encoder_hidden_states=context).sample.float()

    return ddim_invert(unet_fn, latents.to(unet.device), scheduler, num_steps, on_step=on_step, start=start)


def fatezero_edit(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    scheduler: DDIMScheduler,
    num_steps: int,
    controller: FusionController,
    guidance_scale: float,
    *,
    blender: StepBlender | None = None,
    inverted_timesteps: Sequence[int] | None = None,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """Denoise the inverted ``z_T`` under the target prompt, fusing the stored attention (§3.2; methods.md 1.6).

    Each step ``i``: ``controller.begin_step(i)`` loads the maps of inversion step ``T-1-i`` (same
    timestep); one UNet call on the batch ``[z; z]`` with rows ``[negative frames; target frames]``,
    the controller fusing the conditional half; ``eps = eps_u + w (eps_c - eps_u)``; one DDIM step
    (eta 0); then ``blender(i, z)`` if given.

    Args:
        unet: Carries ``FrameAttnProcessor``s whose controller is ``controller``.
        latents: ``z_T`` of the inversion, ``(F, 4, h, w)``.
        embeddings: ``(2, L, D)``: the negative (unconditional) and the target prompt's text embeddings.
        scheduler: The inversion's DDIM scheduler (epsilon prediction); not mutated.
        num_steps: ``T``, the inversion's step count.
        controller: Fuses the inversion's maps; its plan has ``T`` steps.
        guidance_scale: ``w``; 1 is the conditional prediction alone.
        blender: Applied to the latents after each step, e.g. a :class:`LatentBlender`.
        inverted_timesteps: The inversion's ascending timesteps; when given, the edit's must be
            their reverse, or stored maps would be paired with the wrong timesteps.
        on_step: ``on_step(i, t, z)`` after each step, ``z`` the (blended) latents.

    Returns:
        ``z_0``, ``(F, 4, h, w)``, ``latents``' dtype, on the UNet's device.

    Raises:
        ValueError: Bad shapes, or timesteps that differ from the inversion's.
    """
    # 1. validate
    if latents.ndim != 4:
        raise ValueError(f"latents must be (F, C, h, w); got shape {tuple(latents.shape)}")
    if embeddings.ndim != 3 or embeddings.shape[0] != 2:
        shape = tuple(embeddings.shape)
        raise ValueError(f"embeddings must be the (negative, target) pair (2, L, D); got shape {shape}")
    # 2. timesteps: the same as the inversion's, reversed (edit step i <-> inversion step T-1-i)
    timesteps = denoising_timesteps(scheduler, num_steps).tolist()
    if inverted_timesteps is not None and timesteps[::-1] != list(inverted_timesteps):
        raise ValueError(
            "the edit's DDIM timesteps differ from the inversion's; use the inversion's model and scheduler"
        )
    # 3. conditioning: rows [negative frames; target frames], the guidance batch the processors expect
    frames = latents.shape[0]
    embeddings = embeddings.to(unet.dtype)
    context = torch.cat([embeddings[:1].expand(frames, -1, -1), embeddings[1:].expand(frames, -1, -1)])
    # 4. loop
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            controller.begin_step(i)
            set_num_frames(unet, frames)
            batch = torch.cat([latents, latents]).to(unet.device, unet.dtype)
            eps_uncond, eps_cond = unet(batch, t, encoder_hidden_states=context).sample.float().chunk(2)
            eps = classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)
            latents = ddim_denoise_step(eps, t, latents.to(eps.device), scheduler, num_steps)
            if blender is not None:
                latents = blender(i, latents)
            if on_step is not None:
                on_step(i, t, latents)
    return latents
