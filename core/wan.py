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
MAX_SEQUENCE_LENGTH = 512  # Wan's prompt length in tokens
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


def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: list[str], max_length: int = MAX_SEQUENCE_LENGTH) -> torch.Tensor:
    """UMT5 states ``(N, max_length, D)`` float32 of ``prompts``, as Wan's pipelines make them: each prompt cleaned
    (ftfy, HTML entities, whitespace), tokenized to ``max_length``, and the states past its own tokens zeroed."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    tokens = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")  # fmt: skip
    lengths = tokens.attention_mask.gt(0).sum(dim=1)
    with torch.no_grad():
        states = text_encoder(tokens.input_ids.to(text_encoder.device), tokens.attention_mask.to(text_encoder.device))
    keep = torch.arange(max_length)[None, :] < lengths[:, None]
    return states.last_hidden_state.float().cpu() * keep[..., None]


def image_states(image_encoder: Any, processor: Any, image: Any) -> torch.Tensor:
    """The CLIP image encoder's penultimate hidden states ``(1, tokens, D)`` float32 of ``image`` (uint8 ``(H, W, 3)``),
    the image tokens Wan 2.1's image-to-video transformer reads."""
    pixels = processor(images=image, return_tensors="pt").pixel_values
    with torch.no_grad():
        out = image_encoder(pixel_values=pixels.to(image_encoder.device, image_encoder.dtype), output_hidden_states=True)
    return out.hidden_states[-2].float().cpu()


def vace_mask(mask: torch.Tensor) -> torch.Tensor:
    """VACE's mask channels ``(1, 64, f, h, w)`` of a pixel mask ``(1, 1, F, H, W)`` (1: generate): each 8x8 cell's
    pixels as 64 channels, ``F`` frames taken to the ``(F + 3) / 4`` latent frames by nearest sampling."""
    _, _, frames, height, width = mask.shape
    cells = mask[0, 0].reshape(frames, height // SPATIAL, SPATIAL, width // SPATIAL, SPATIAL)
    cells = cells.permute(2, 4, 0, 1, 3).flatten(0, 1)  # (64, F, h, w): the pixel (dy, dx) of each cell
    size = ((frames + TEMPORAL - 1) // TEMPORAL, height // SPATIAL, width // SPATIAL)
    return torch.nn.functional.interpolate(cells[None], size=size, mode="nearest-exact")


def vace_control(vae: Any, video: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """VACE's control input ``(1, 96, f, h, w)`` (``f + 1`` latent frames with a reference image first): the normalised
    VAE latents of the frames it keeps (``video`` where ``mask`` is 0) and of those it makes (``video`` where it is
    1: the structure), then :func:`vace_mask`. ``video`` ``(1, 3, F, H, W)`` and ``reference`` ``(1, 3, H, W)`` are in
    [-1, 1]; ``mask`` ``(1, 1, F, H, W)`` is thresholded at 0.5. The caller holds the VAE's lock."""
    mask = (mask > 0.5).to(video.dtype)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float().cpu()
        return normalise(latents, vae.config)

    latents, masks = torch.cat([encode(video * (1 - mask)), encode(video * mask)], dim=1), vace_mask(mask)
    if reference is not None:
        image = encode(reference.unsqueeze(2))
        latents = torch.cat([torch.cat([image, torch.zeros_like(image)], dim=1), latents], dim=2)
        masks = torch.cat([masks.new_zeros(1, masks.shape[1], 1, *masks.shape[-2:]), masks], dim=2)
    return torch.cat([latents, masks], dim=1)


@dataclass
class WanVelocity:
    """The transformer as a flow-matching velocity field ``v(x, sigma, timestep)`` on latents ``(B, 16, f, h, w)``,
    with the conditioning of one window: the prompt's embeddings, the image-to-video channels (mask and
    conditioning latents, ``(B, 20, f, h, w)``) and CLIP image states where the checkpoint reads them, and
    classifier-free guidance against ``negative`` embeddings when ``guidance_scale > 1``. A VACE transformer reads
    its ``control`` input (:func:`vace_control`) through its control layers, each scaled by ``control_scale``."""

    transformer: Any
    prompt: torch.Tensor
    negative: torch.Tensor | None = None
    guidance_scale: float = 1.0
    condition: torch.Tensor | None = None
    image: torch.Tensor | None = None
    control: torch.Tensor | None = None
    control_scale: float = 1.0

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
        control: dict[str, Any] = {}
        if self.control is not None:
            layers = len(self.transformer.config.vace_layers)
            control = {"control_hidden_states": self.control.to(hidden.device, hidden.dtype).expand(hidden.shape[0], -1, -1, -1, -1),
                       "control_hidden_states_scale": torch.full((layers,), self.control_scale, device=hidden.device, dtype=hidden.dtype)}  # fmt: skip
        with torch.no_grad():
            return self.transformer(hidden_states=hidden, timestep=t, encoder_hidden_states=text,
                                    encoder_hidden_states_image=image, return_dict=False, **control)[0]  # fmt: skip


@dataclass
class BoundaryVelocity:
    """Wan 2.2 A14B's two experts as one velocity field: ``high`` (the checkpoint's ``transformer``) at timesteps at or
    above ``boundary`` (``boundary_ratio`` of the training timesteps), ``low`` (``transformer_2``) below, as diffusers'
    Wan 2.2 pipelines switch them."""

    high: Any
    low: Any
    boundary: float

    def __call__(self, x: torch.Tensor, sigma: float, timestep: float) -> torch.Tensor:
        return (self.high if timestep >= self.boundary else self.low)(x, sigma, timestep)
