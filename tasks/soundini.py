"""denoise_latents (soundini): the masked region re-rendered to follow the sound, on SD 1.5, resumable by step."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from reelflow.core.editing.gen1 import edit_timesteps
from reelflow.core.editing.soundini import Region, decode, soundini_denoise
from reelflow.core.frames import from_model_range, to_model_range
from reelflow.core.guidance.sound import background_l1, direction_loss, flow_loss, ramp, range_loss, sound_loss
from reelflow.core.text import encode_prompts
from reelflow.schemas.calls import StageCall
from reelflow.schemas.kinds import NoAttrs
from reelflow.schemas.refs import ArtifactRef
from reelflow.schemas.soundini import SoundiniParams
from reelflow.tasks.models import model_lock
from reelflow.tasks.preflight import PreflightContext, stage_check
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@stage_task("denoise_latents", "soundini")
def denoise_soundini(call: StageCall) -> ArtifactRef:
    """Edited ``frames (F, H, W, 3)`` (uint8, the source's background pasted outside the mask) and their ``latents
    (F, 4, h, w)`` before decoding. Resumable by step: the latents after each finished step are kept."""
    return run_stage(call, _denoise, resumable=True)


def _denoise(ctx: StageContext) -> NoAttrs:
    p: SoundiniParams = ctx.call.stage.params
    source = ctx.input("latents")["latents"]
    frames, masks = ctx.input("frames")["frames"], ctx.input("mask")["mask"]
    audio = torch.from_numpy(ctx.array("audio", "embeddings", "float32"))
    flows = {name: ctx.input("flow")[name] for name in ("forward", "backward", "occluded_forward", "occluded_backward")}
    unet, vae, clip = ctx.model("unet"), ctx.model("vae"), ctx.model("clip", cls="CLIPVisionModelWithProjection")
    scheduler = ctx.model("unet", "scheduler", cls="DDIMScheduler")
    embeds = encode_prompts(ctx.model("text_encoder", "tokenizer"), ctx.model("text_encoder"), [""])
    count, latent_size = source.shape[0], tuple(source.shape[-2:])
    mask = torch.from_numpy(np.asarray(masks[:], np.float32))[:, None]  # (F, 1, H, W)
    region = Region(F.adaptive_max_pool2d(mask, latent_size), torch.from_numpy(np.asarray(source[:], np.float32)),
                    _noise(ctx.call.seed, count, tuple(source.shape[1:])))  # fmt: skip
    timesteps = edit_timesteps(scheduler, p.num_steps, p.strength)
    state = ctx.writer.create_array("latents", shape=source.shape, dtype=np.float32, dims=("frame", "latent_channel", "y", "x"))
    done = [i for i in range(len(timesteps)) if ctx.writer.is_done(f"step-{i}")]
    first = done[-1] + 1 if done else 0
    z = torch.from_numpy(np.asarray(state[:], np.float32)) if done else region.noised(slice(None), float(scheduler.alphas_cumprod[timesteps[0]]))
    losses = _losses(p, frames, mask, audio, flows, clip, ctx.call.seed)

    def keep(i: int, latents: torch.Tensor) -> None:
        state[:] = latents.numpy()
        ctx.writer.mark_done(f"step-{first + i}")
        ctx.progress.advance(1)

    ctx.progress.start(len(timesteps) - first)
    with model_lock(unet):
        z = soundini_denoise(unet, vae, z, embeds[:1], scheduler, p.num_steps, timesteps[first:], region, losses, chunk=p.chunk,
                             on_step=keep, first_step=first)  # fmt: skip
    out = ctx.writer.create_array("frames", shape=frames.shape, dtype=np.uint8, dims=("frame", "y", "x", "rgb"))
    for start in range(0, count, p.chunk):
        part = slice(start, min(start + p.chunk, count))
        with torch.inference_mode():
            edited = from_model_range(decode(vae, z[part].to(vae.device, vae.dtype)).float().cpu())
        inside = np.asarray(masks[part])[..., None]
        out[part] = np.where(inside, edited, np.asarray(frames[part]))  # the source's background, pasted back
    return NoAttrs()


def _noise(seed: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """One noise for every frame (the reference repeats one sample across frames), from the pipeline seed."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).expand(count, *shape)


def _losses(p: SoundiniParams, frames: Any, mask: torch.Tensor, audio: torch.Tensor, flows: dict[str, Any], clip: Any, seed: int):  # noqa: ANN202
    """``losses(pixels, frames seen, step)``: the weighted sum the sampler descends, on the frames ``seen`` (the
    chunk, after the previous chunk's last frame when there is one)."""

    def losses(pixels: torch.Tensor, seen: slice, step: int) -> torch.Tensor:
        where, anchored = slice(seen.start, seen.stop), seen.start > 0 and pixels.shape[0] > 1
        region = mask[where].to(pixels)
        total = pixels.sum() * 0.0
        if p.sound or p.direction:
            embeds = _clip_views(clip, pixels * region, p.augmentations, seed * 100_003 + step * 1_009 + seen.start)
            target = audio[where].repeat(p.augmentations, 1)
            if p.sound:
                own_rows = torch.arange(len(embeds)) % pixels.shape[0] >= int(anchored)  # the anchor's sound is its own chunk's
                total = total + p.sound * sound_loss(embeds[own_rows], target[own_rows])
            if p.direction and pixels.shape[0] > 1:
                first_view = embeds[: pixels.shape[0]]
                total = total + p.direction * direction_loss(first_view, audio[where])
        weight = ramp(step, p.ramp_steps)
        if p.flow and pixels.shape[0] > 1:
            pairs = slice(seen.start, seen.stop - 1)
            fields = {name: torch.from_numpy(np.asarray(array[pairs])) for name, array in flows.items()}
            total = total + p.flow * weight * flow_loss(pixels, fields["forward"].to(pixels), fields["backward"].to(pixels), region,
                                                        fields["occluded_forward"], fields["occluded_backward"])  # fmt: skip
        if p.background:
            original = to_model_range(np.asarray(frames[where])).to(pixels)
            total = total + p.background * weight * background_l1(pixels, original, region)
        if p.range:
            total = total + p.range * range_loss(pixels)
        return total

    return losses


def _clip_views(clip: Any, pixels: torch.Tensor, views: int, seed: int) -> torch.Tensor:
    """CLIP image embeddings of ``views`` views of each frame (``(views * n, D)``, view-major): the first as it is, the
    others randomly rotated, shifted and warped in perspective (p = 0.7 each), as the reference augments."""
    size = clip.config.image_size
    images = F.interpolate((pixels + 1.0) / 2.0, size=(size, size), mode="bilinear", align_corners=False)
    # fill=None: torchvision fills in place otherwise, which autograd cannot follow (the reference pads with the border)
    augment = v2.RandomApply([v2.RandomAffine(degrees=15, translate=(0.1, 0.1), fill=None),
                              v2.RandomPerspective(0.7, p=0.7, fill=None)], p=0.7)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = torch.cat([images, *(augment(images) for _ in range(views - 1))])
    mean = torch.tensor(CLIP_MEAN, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    parameter = next(clip.parameters())
    return clip(pixel_values=((batch - mean) / std).to(parameter.device, parameter.dtype)).image_embeds.float()


@stage_check("denoise_latents", "soundini")
def _check(ctx: PreflightContext) -> None:
    """Refuses, before any model loads, a CLIP space of another width than the audio encoder's (512)."""
    config = ctx.model_config("clip") or {}
    width = config.get("projection_dim", (config.get("vision_config") or {}).get("projection_dim", 512))
    if width != 512:
        raise ValueError(f"the clip role's image embeddings are {width}-wide but the audio encoders embed into CLIP "
                         "ViT-B/32's 512-wide space; use openai/clip-vit-base-patch32")  # fmt: skip
