"""Videoshop's pieces around the EDM inversion: Stable Video Diffusion's conditioning, latent
normalisation and rescaling, and the colour match that stitches windows of a long clip.

Videoshop (Fan et al. 2024, arXiv 2403.14617; methods.md 2.3) edits a clip from an edited first
frame: it normalises the clip's latents, inverts them with Stable Video Diffusion conditioned on the
source first frame (:mod:`reelflow.core.inversion.edm`), generates back conditioned on the edited
frame with classifier-free guidance, and rescales the result to the edited frame's latent
statistics. The reference code's choices are kept and named where they differ from the paper:

- latent normalisation is per frame over (C, h, w) in the code, per channel in the paper (a parameter);
- the inversion's conditioning latents are z-scored and divided by the VAE's scaling factor, the
  generation's are the raw VAE mode (an asymmetry of the code, kept for fidelity);
- standard deviations are torch's default (unbiased), as the reference computes them.

Notation: ``x0`` = normalised clean latents ``(F, C, h, w)``, ``z_e`` = the edited frame's scaled
latents ``(C, h, w)``, ``l`` = conditioning latents ``(C, h, w)`` (unscaled VAE mode of the noise-
augmented image), ``e`` = the CLIP image embedding ``(1, D)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from reelflow.schemas.videoshop import Normalisation

EPS = 1e-6


@dataclass(frozen=True)
class ImageCondition:
    """What Stable Video Diffusion is conditioned on, from one image.

    Attributes:
        embeds: CLIP image embedding ``(1, D)``.
        latents: Unscaled VAE mode of the noise-augmented image ``(C, h, w)`` (the UNet's concat input).
        clean: Scaled VAE mode of the clean image ``(C, h, w)`` (``z_e``, the rescaling target).
    """

    embeds: torch.Tensor
    latents: torch.Tensor
    clean: torch.Tensor


def condition_on_image(
    image: np.ndarray,
    *,
    image_encoder: Any,
    processor: Any,
    vae: Any,
    noise_aug_strength: float,
    generator: torch.Generator,
) -> ImageCondition:
    """Embed and encode ``image`` (uint8 ``(H, W, 3)``) as Stable Video Diffusion's pipeline does.

    The CLIP input is the whole image squashed to the encoder's size (antialiased, as the
    reference's 224x224 resize) and normalised with the processor's mean and std; the concat latents
    encode ``image + noise_aug_strength * N(0, I)`` in ``[-1, 1]`` pixels.
    """
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    noise = torch.randn(pixels.shape, generator=generator)
    with torch.inference_mode():
        embeds = image_encoder(_clip_input(pixels, processor).to(image_encoder.device, image_encoder.dtype)).image_embeds
        noisy = _vae_mode(vae, pixels + noise_aug_strength * noise)
        clean = _vae_mode(vae, pixels) * vae.config.scaling_factor
    return ImageCondition(embeds.float().cpu().clone(), noisy[0].clone(), clean[0].clone())


def _clip_input(pixels: torch.Tensor, processor: Any) -> torch.Tensor:
    crop = processor.crop_size  # a dict, or transformers 5's SizeDict
    size = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
    resized = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return ((resized + 1.0) / 2.0 - mean) / std


def _vae_mode(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float().cpu()


def inversion_latents(latents: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """The inversion's concat latents: one global z-score, then divided by the scaling factor (reference code)."""
    return (latents - latents.mean()) / (latents.std() + EPS) / scaling_factor


def normalise_latents(x0: torch.Tensor, mode: Normalisation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x0 - mean) / (std + eps)`` per frame over (C, h, w), per channel over (F, h, w), or not at all.

    Returns the normalised latents and the ``mean`` and ``std`` used, shaped to broadcast against ``x0``.
    """
    if mode == "none":
        ones = torch.ones((1,) * x0.ndim)
        return x0, ones * 0.0, ones
    dims = (1, 2, 3) if mode == "per_frame" else (0, 2, 3)
    mean, std = x0.mean(dim=dims, keepdim=True), x0.std(dim=dims, keepdim=True)
    return (x0 - mean) / (std + EPS), mean, std


def rescale_latents(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Map every frame of ``x`` ``(F, C, h, w)`` with one per-channel affine map that gives frame 0 the
    per-channel mean and std of ``reference`` ``(C, h, w)`` (Videoshop's latent rescaling)."""
    mean, std = x[0].mean(dim=(1, 2)), x[0].std(dim=(1, 2))
    target_mean, target_std = reference.mean(dim=(1, 2)), reference.std(dim=(1, 2))
    scale = (target_std / std)[None, :, None, None]
    return (x - mean[None, :, None, None]) * scale + target_mean[None, :, None, None]


def guidance_ramp(min_scale: float, max_scale: float, frames: int) -> torch.Tensor:
    """Per-frame guidance ``(F,)``: linear from ``min_scale`` on the first frame to ``max_scale`` on the last."""
    return torch.linspace(min_scale, max_scale, frames)


def added_time_ids(fps: int, motion_bucket_id: int, noise_aug_strength: float) -> torch.Tensor:
    """``(1, 3)`` micro-conditioning: ``fps - 1``, the motion bucket and the noise augmentation (as the SVD pipeline)."""
    return torch.tensor([[fps - 1, motion_bucket_id, noise_aug_strength]], dtype=torch.float32)


class SvdDenoiser:
    """Stable Video Diffusion's UNet as an EDM network on ``(F, C, h, w)`` latents, for one clip.

    With ``guidance`` (a per-frame ``(F,)`` tensor) the call batches the unconditional half (zero
    embedding, zero concat latents, as the SVD pipeline) and returns ``F_u + g * (F_c - F_u)``;
    without it the call is conditional only (Videoshop's inversion).
    """

    def __init__(
        self, unet: Any, condition: ImageCondition, time_ids: torch.Tensor, *, concat: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        self.unet, self.guidance = unet, guidance
        device, dtype = unet.device, unet.dtype
        embeds, latents = condition.embeds[:, None], condition.latents if concat is None else concat
        self.embeds = embeds.to(device, dtype)
        self.latents = latents[None, None].to(device, dtype)  # (1, 1, C, h, w), repeated over frames per call
        self.time_ids = time_ids.to(device, dtype)
        if guidance is not None:
            self.embeds = torch.cat([torch.zeros_like(self.embeds), self.embeds])
            self.latents = torch.cat([torch.zeros_like(self.latents), self.latents])
            self.time_ids = torch.cat([self.time_ids, self.time_ids])

    def __call__(self, sample: torch.Tensor, sigma: float, timestep: float) -> torch.Tensor:
        frames = sample.shape[0]
        x = sample[None].to(self.unet.device, self.unet.dtype)
        if self.guidance is not None:
            x = torch.cat([x, x])
        concat = self.latents.expand(-1, frames, -1, -1, -1)
        with torch.inference_mode():
            # The timestep stays float32, as the pipeline passes it: its sinusoidal embedding is precision-sensitive.
            out = self.unet(torch.cat([x, concat], dim=2), torch.tensor(timestep, device=x.device, dtype=torch.float32),
                            encoder_hidden_states=self.embeds, added_time_ids=self.time_ids, return_dict=False)[0]  # fmt: skip
        out = out.float().cpu()
        if self.guidance is None:
            return out[0].clone()
        g = self.guidance.view(-1, 1, 1, 1)
        return (out[0] + g * (out[1] - out[0])).clone()


def channel_stats(frames: np.ndarray) -> np.ndarray:
    """Per-frame, per-channel mean and std of RGB frames ``(N, H, W, 3)``: ``(N, 2, 3)``."""
    pixels = frames.astype(np.float32).reshape(frames.shape[0], -1, 3)
    return np.stack([pixels.mean(axis=1), pixels.std(axis=1)], axis=1)


def colour_map(own: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The per-channel affine map ``(2, 3)`` (scale, shift) that gives the frames ``own`` the mean and std of
    ``reference`` (the previous window's output on the same source frames)."""
    own_px = own.astype(np.float32).reshape(-1, 3)
    ref_px = reference.astype(np.float32).reshape(-1, 3)
    scale = ref_px.std(axis=0) / np.maximum(own_px.std(axis=0), 1e-3)
    return np.stack([scale, ref_px.mean(axis=0) - scale * own_px.mean(axis=0)]).astype(np.float32)


def fade_weights(count: int, head: int, tail: int) -> np.ndarray:
    """``(count,)`` strength of a window's colour map per frame: whole on the ``head`` frames it shares with
    the previous window, fading linearly to none by the ``tail`` frames it shares with the next one (or its
    end). So each window joins the one before it, and leaves its own colours to the one after: maps
    never compound from window to window."""
    stop = count - tail  # the first frame shared with the next window, or the end
    t = np.arange(count, dtype=np.float32)
    return np.clip((stop - t) / max(stop - head + 1, 1), 0.0, 1.0) * (t >= head) + (t < head)


def apply_colour_map(frames: np.ndarray, colour: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``frames`` (uint8 ``(N, H, W, 3)``) mapped by ``colour`` ``(2, 3)`` with per-frame ``weights`` ``(N,)``."""
    scale, shift = colour
    w = weights.reshape(-1, 1, 1, 1)
    mapped = frames.astype(np.float32) * (1 + w * (scale - 1)) + w * shift
    return np.clip(mapped.round(), 0, 255).astype(np.uint8)


def boundary_jumps(stats: np.ndarray, windows: list[tuple[int, int]]) -> dict[str, float]:
    """Colour continuity of a clip stitched from ``windows`` (``(start, stop)``, in order, overlapping),
    from its frames' :func:`channel_stats` ``(F, 2, 3)``.

    ``change(i) = max over channels of |mean_i - mean_{i-1}| + |std_i - std_{i-1}|``. A boundary is
    every change from the last frame before an overlap to the first frame after it; the rest are
    changes inside one window. Returns the largest and mean
    boundary change (a boundary's change is its largest) and the mean and largest change inside.
    """
    count = stats.shape[0]
    change = np.abs(np.diff(stats, axis=0)).sum(axis=1).max(axis=1)  # change[i - 1]: frame i - 1 -> i
    zones = [range(start, min(previous_stop, count - 1) + 1)
             for (_, previous_stop), (start, _) in zip(windows, windows[1:])]  # fmt: skip
    at = [max(change[i - 1] for i in zone) for zone in zones if len(zone)]
    crossing = {i for zone in zones for i in zone}
    inside = [change[i - 1] for i in range(1, count) if i not in crossing]
    return {
        "boundary_max": float(max(at, default=0.0)),
        "boundary_mean": float(np.mean(at)) if at else 0.0,
        "within_mean": float(np.mean(inside)) if inside else 0.0,
        "within_max": float(max(inside, default=0.0)),
    }

