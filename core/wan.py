"""Wan 2.x by role: what a checkpoint is, the shapes it takes, its latents, and its transformer as a velocity field.

Wan's VAE is causal in time: ``F`` frames give ``(F - 1) / 4 + 1`` latent frames (the first alone, then
four per latent frame), so a clip must have ``4k + 1`` frames, and 8x8 pixels make a latent cell, which the
transformer's 2x2 patches then pair: heights and widths must be multiples of 16. Latents are normalised per
channel with the VAE config's ``latents_mean`` and ``latents_std`` (not one scaling factor). This is the VAE of
Wan 2.1 and of Wan 2.2's A14B models (16 channels); Wan 2.2 TI2V-5B's (48 channels, 16x in space) is refused
by the stages that read a VAE's config. The image-to-video transformer reads 36 channels: the noisy
latents, a 4-channel mask marking the given frames (4 channels a latent frame: one per source frame it
stands for, the first latent frame's single source frame repeated 4 times), and the
VAE latents of the conditioning video (the first frame, then zeros); it also reads the CLIP image encoder's
penultimate hidden states where the checkpoint has an image projection (Wan 2.1 I2V). VACE reads only the
16 latent channels, with its control video through its own layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

TEMPORAL, SPATIAL, PATCH = 4, 8, 2  # the VAE's time and space factors, the transformer's spatial patch
FramePolicy = Literal["trim", "pad", "refuse"]
KINDS = ("i2v", "vace", "t2v")


def checkpoint_kind(transformer_class: str, config: dict[str, Any]) -> str:
    """``i2v``, ``vace`` or ``t2v`` from the transformer's class and config (no weights needed).

    VACE is its own class; image-to-video takes the conditioning video's latents and mask beside the noisy
    latents (36 input channels in Wan 2.1 and 2.2 A14B) or a CLIP image projection (``image_dim``).
    """
    if transformer_class == "WanVACETransformer3DModel":
        return "vace"
    if config.get("in_channels", 16) > config.get("out_channels", 16) or config.get("image_dim"):
        return "i2v"
    return "t2v"


@dataclass(frozen=True)
class FramePlan:
    """How a clip of ``count`` frames meets Wan's ``4k + 1``: ``used`` source frames, then ``padded`` copies of
    the last one; ``frames = used + padded``."""

    count: int
    used: int
    padded: int

    @property
    def frames(self) -> int:
        return self.used + self.padded

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // TEMPORAL + 1


def plan_frames(count: int, policy: FramePolicy, *, what: str = "the clip") -> FramePlan:
    """Meet ``4k + 1`` frames by ``policy``: ``trim`` drops the last frames down to the nearest, ``pad`` repeats the
    last frame up to it, ``refuse`` raises unless ``count`` already is one.

    Raises:
        ValueError: ``count`` is below 1, or not ``4k + 1`` under ``refuse``; the message names both neighbours.
    """
    if count < 1:
        raise ValueError(f"{what} has {count} frames; Wan needs at least 1")
    below = (count - 1) // TEMPORAL * TEMPORAL + 1
    above = below if below == count else below + TEMPORAL
    if policy == "trim":
        return FramePlan(count, below, 0)
    if policy == "pad":
        return FramePlan(count, count, above - count)
    if policy == "refuse" and below != count:
        raise ValueError(f"{what} has {count} frames; Wan takes 4k+1 frames ({below} or {above}): decode {below} or {above} "
                         f"frames (decode_video's num_frames), or pad (repeat the last frame to {above})")  # fmt: skip
    return FramePlan(count, count, 0)


def check_size(height: int, width: int, *, what: str = "the frames") -> None:
    """Refuse a frame size the VAE and the transformer's patches cannot tile, naming the nearest sizes that fit.

    Raises:
        ValueError: ``height`` or ``width`` is not a multiple of 16.
    """
    step = SPATIAL * PATCH
    bad = [(name, value) for name, value in (("height", height), ("width", width)) if value % step or value < step]
    if bad:
        fixes = "; ".join(f"{name} {value}: use {max(step, value // step * step)} or {(value // step + 1) * step}" for name, value in bad)
        raise ValueError(f"{what} are {width}x{height}; Wan needs multiples of {step} (8x8 pixels a latent, 2x2 latents a "
                         f"patch): {fixes} (decode_video's multiple={step} does it)")  # fmt: skip


def latent_stats(vae_config: dict[str, Any], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and std, shaped ``(1, C, 1, 1, 1)`` like ``like``."""
    channels = vae_config["z_dim"]
    mean = torch.tensor(vae_config["latents_mean"], dtype=like.dtype, device=like.device).view(1, channels, 1, 1, 1)
    std = torch.tensor(vae_config["latents_std"], dtype=like.dtype, device=like.device).view(1, channels, 1, 1, 1)
    return mean, std


def normalise(latents: torch.Tensor, vae_config: dict[str, Any]) -> torch.Tensor:
    """Raw VAE latents ``(B, C, f, h, w)`` to the transformer's scale: ``(x - mean) / std`` per channel."""
    mean, std = latent_stats(vae_config, latents)
    return (latents - mean) / std


def denormalise(latents: torch.Tensor, vae_config: dict[str, Any]) -> torch.Tensor:
    """The transformer's latents back to the VAE's: ``x * std + mean`` per channel."""
    mean, std = latent_stats(vae_config, latents)
    return latents * std + mean


def first_frame_mask(frames: int, latent_shape: tuple[int, int], *, known: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The image-to-video mask ``(1, 4, f, h, w)``: 1 for the first ``known`` source frames, 0 for the others, the first
    latent frame's single source frame repeated 4 times so every latent frame has 4 mask channels."""
    height, width = latent_shape
    mask = torch.zeros(1, 1, frames, height, width, dtype=dtype)
    mask[:, :, :known] = 1
    mask = torch.cat([mask[:, :, :1].repeat_interleave(TEMPORAL, dim=2), mask[:, :, 1:]], dim=2)
    return mask.view(1, -1, TEMPORAL, height, width).transpose(1, 2)


def i2v_condition(vae: Any, image: torch.Tensor, frames: int) -> torch.Tensor:
    """The image-to-video channels of one window, ``(1, 20, f, h, w)``: the first-frame mask, then the normalised VAE
    latents (the distribution's mode) of ``image`` ``(1, 3, H, W)`` in [-1, 1] followed by ``frames - 1`` zero frames.
    The VAE keeps a feature cache while it encodes: a caller sharing it between threads holds its lock."""
    height, width = image.shape[-2:]
    video = torch.cat([image.unsqueeze(2), image.new_zeros(1, 3, frames - 1, height, width)], dim=2)
    with torch.no_grad():
        latents = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode().float().cpu()
    latents = normalise(latents, vae.config)
    return torch.cat([first_frame_mask(frames, tuple(latents.shape[-2:])), latents], dim=1)


@dataclass
class WanVelocity:
    """The transformer as a flow-matching velocity field ``v(x, sigma, timestep)`` on latents ``(B, 16, f, h, w)``,
    with the conditioning of one window: the prompt's embeddings, the image-to-video channels (mask and
    conditioning latents, ``(B, 20, f, h, w)``) and CLIP image states where the checkpoint reads them, and
    classifier-free guidance against ``negative`` embeddings when ``guidance_scale > 1``."""

    transformer: Any
    prompt: torch.Tensor
    negative: torch.Tensor | None = None
    guidance_scale: float = 1.0
    condition: torch.Tensor | None = None
    image: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: float, timestep: float) -> torch.Tensor:
        dtype, device, batch = self.transformer.dtype, self.transformer.device, x.shape[0]
        condition = None if self.condition is None else self.condition.to(x).expand(batch, *self.condition.shape[1:])
        hidden = (x if condition is None else torch.cat([x, condition], dim=1)).to(device, dtype)
        t = torch.full((batch,), float(timestep), device=device)
        image = None if self.image is None else self.image.to(device, dtype).expand(batch, *self.image.shape[1:])
        v = self._predict(hidden, t, self.prompt, image)
        if self.guidance_scale > 1.0 and self.negative is not None:
            unconditional = self._predict(hidden, t, self.negative, image)
            v = unconditional + self.guidance_scale * (v - unconditional)
        return v.to(x.device, x.dtype)

    def _predict(self, hidden: torch.Tensor, t: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        text = text.to(hidden.device, hidden.dtype).expand(hidden.shape[0], -1, -1)
        with torch.no_grad():
            return self.transformer(hidden_states=hidden, timestep=t, encoder_hidden_states=text,
                                    encoder_hidden_states_image=image, return_dict=False)[0]  # fmt: skip
