"""denoise_latents (soundini): the masked region re-rendered to follow the sound (or a prompt: embed_content
clip_text), on SD 1.5, resumable by step."""

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
from reelflow.schemas.soundini import ClipText, SoundiniParams
from reelflow.tasks.models import model_lock
from reelflow.tasks.preflight import PreflightContext, stage_check
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@stage_task("denoise_latents", "soundini")
def denoise_soundini(call: StageCall) -> ArtifactRef:
    """Edited ``frames (F, H, W, 3)`` (uint8, the source's background pasted outside the mask), their ``latents
    (F, 4, h, w)`` before decoding, and the latents after every step, ``steps (K, F, 4, h, w)``. Resumable by step."""
    return run_stage(call, _denoise, resumable=True)


def _denoise(ctx: StageContext) -> NoAttrs:
    p: SoundiniParams = ctx.call.stage.params
    source = ctx.input("latents")["latents"]
    frames, masks = ctx.input("frames")["frames"], ctx.input("mask")["mask"]
    count = source.shape[0]
    target = torch.from_numpy(ctx.array("target", "embeddings", "float32"))
    audio = target.expand(count, -1) if ctx.call.inputs["target"].kind == "content/clip_text" else target  # a prompt: all
    flows = {name: ctx.input("flow")[name] for name in ("forward", "backward", "occluded_forward", "occluded_backward")}
    unet, vae, clip = ctx.model("unet"), ctx.model("vae"), ctx.model("clip", cls="CLIPVisionModelWithProjection")
    scheduler = ctx.model("unet", "scheduler", cls="DDIMScheduler")
    embeds = encode_prompts(ctx.model("text_encoder", "tokenizer"), ctx.model("text_encoder"), [""])
    latent_shape = tuple(source.shape[1:])
    region = Region(_latent_masks(masks, latent_shape[-2:], p.chunk), torch.from_numpy(np.asarray(source[:], np.float32)),
                    _noise(ctx.call.seed, count, latent_shape))  # fmt: skip
    timesteps = edit_timesteps(scheduler, p.num_steps, p.strength)
    # Every step's latents in a slot of their own: a crash mid-write leaves the last finished step whole.
    steps = ctx.writer.create_array("steps", shape=(len(timesteps), *source.shape), dtype=np.float32,
                                    dims=("step", "frame", "latent_channel", "y", "x"), chunks=(1, *source.shape))  # fmt: skip
    done = [i for i in range(len(timesteps)) if ctx.writer.is_done(f"step-{i}")]
    first = done[-1] + 1 if done else 0
    z = torch.from_numpy(np.asarray(steps[first - 1], np.float32)) if done else region.noised(
        slice(None), float(scheduler.alphas_cumprod[timesteps[0]]))  # fmt: skip
    losses = _losses(p, frames, masks, audio, flows, clip, ctx.call.seed, max(1, round(p.ramp * len(timesteps))))

    def keep(i: int, latents: torch.Tensor) -> None:
        steps[first + i] = latents.numpy()
        ctx.writer.mark_done(f"step-{first + i}")
        ctx.progress.advance(1)

    ctx.progress.start(len(timesteps) - first)
    with model_lock(unet):
        z = soundini_denoise(unet, vae, z, embeds[:1], scheduler, p.num_steps, timesteps[first:], region, losses, chunk=p.chunk,
                             on_step=keep, first_step=first)  # fmt: skip
    ctx.writer.write_array("latents", z.numpy(), dims=("frame", "latent_channel", "y", "x"), dtype=np.float32)
    out = ctx.writer.create_array("frames", shape=frames.shape, dtype=np.uint8, dims=("frame", "y", "x", "rgb"))
    for start in range(0, count, p.chunk):
        part = slice(start, min(start + p.chunk, count))
        with torch.inference_mode():
            edited = from_model_range(decode(vae, z[part].to(vae.device, vae.dtype)).float().cpu())
        inside = np.asarray(masks[part])[..., None]
        out[part] = np.where(inside, edited, np.asarray(frames[part]))  # the source's background, pasted back
    return NoAttrs()


def _latent_masks(masks: Any, size: tuple[int, int], chunk: int) -> torch.Tensor:
    """The region on the latent grid, ``(F, 1, h, w)``: a latent cell is inside when any of its pixels is (max-pooled),
    a chunk at a time."""
    parts = [F.adaptive_max_pool2d(torch.from_numpy(np.asarray(masks[s : s + chunk], np.float32))[:, None], size)
             for s in range(0, masks.shape[0], chunk)]  # fmt: skip
    return torch.cat(parts)


def _noise(seed: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """One noise for every frame (the reference repeats one sample across frames), from the pipeline seed."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).expand(count, *shape)


def _losses(p: SoundiniParams, frames: Any, masks: Any, audio: torch.Tensor, flows: dict[str, Any], clip: Any, seed: int,
            ramp_steps: int):  # noqa: ANN202
    """``losses(pixels, frames seen, anchored, step)``: the weighted sum of per-frame terms the sampler descends. The
    fixed neighbour (``anchored``: the first of ``pixels``) counts only in the terms that link it to the chunk
    (direction, flow); its own terms belong to its own chunk."""

    def losses(pixels: torch.Tensor, seen: slice, anchored: bool, step: int) -> torch.Tensor:
        region = torch.from_numpy(np.asarray(masks[seen], np.float32))[:, None].to(pixels)
        own = slice(int(anchored), None)
        total = pixels.new_zeros(())
        if p.sound or p.direction:
            embeds = _clip_views(clip, pixels * region, p.augmentations, seed * 100_003 + step * 1_009 + seen.start)
            n = pixels.shape[0]
            if p.sound:
                per_view = sound_loss(embeds, audio[seen].repeat(p.augmentations, 1)).view(p.augmentations, n)
                total = total + p.sound * per_view.mean(0)[own].sum()
            if p.direction:
                total = total + p.direction * direction_loss(embeds[:n], audio[seen]).sum()
        weight = ramp(step, ramp_steps)
        if p.flow and pixels.shape[0] > 1:
            pairs = slice(seen.start, seen.stop - 1)
            fields = {name: torch.from_numpy(np.asarray(array[pairs])) for name, array in flows.items()}
            total = total + p.flow * weight * flow_loss(pixels, fields["forward"].to(pixels), fields["backward"].to(pixels), region,
                                                        fields["occluded_forward"], fields["occluded_backward"]).sum()  # fmt: skip
        if p.background:
            original = to_model_range(np.asarray(frames[seen])).to(pixels)
            total = total + p.background * weight * background_l1(pixels, original, region)[own].sum()
        if p.range:
            total = total + p.range * range_loss(pixels)[own].sum()
        return total

    return losses


def _clip_views(clip: Any, pixels: torch.Tensor, views: int, seed: int) -> torch.Tensor:
    """CLIP image embeddings of ``views`` views of each frame, ``(views * n, D)`` view-major: the first as it is, the
    others each frame on its own randomly rotated and shifted (p = 0.7) and warped in perspective (p = 0.7), as the
    reference's kornia augmentations (which pad with the border; torchvision pads with zeros here: its fill is done
    in place, which autograd cannot follow)."""
    size = clip.config.image_size
    images = F.interpolate((pixels + 1.0) / 2.0, size=(size, size), mode="bilinear", align_corners=False)
    augment = v2.Compose([v2.RandomApply([v2.RandomAffine(degrees=15, translate=(0.1, 0.1), fill=None)], p=0.7),
                          v2.RandomPerspective(0.7, p=0.7, fill=None)])  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = torch.cat([images, *(torch.cat([augment(image[None]) for image in images]) for _ in range(views - 1))])
    mean = torch.tensor(CLIP_MEAN, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    parameter = next(clip.parameters())
    return clip(pixel_values=((batch - mean) / std).to(parameter.device, parameter.dtype)).image_embeds.float()


@stage_task("embed_content", "clip_text")
def embed_clip_text(call: StageCall) -> ArtifactRef:
    """The prompt's projected CLIP text embedding, ``embeddings (1, D)``: Soundini's text-guided target."""
    return run_stage(call, _embed_text)


def _embed_text(ctx: StageContext) -> ClipText:
    prompt = ctx.call.stage.params.prompt
    tokenizer, model = ctx.model("clip", "tokenizer"), ctx.model("clip", cls="CLIPTextModelWithProjection")
    tokens = tokenizer([prompt], padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.inference_mode():
        embedding = model(input_ids=tokens.input_ids.to(model.device)).text_embeds.float().cpu()
    ctx.writer.write_array("embeddings", embedding.numpy(), dims=("prompt", "embedding"), dtype=np.float32)
    return ClipText(prompt=prompt)


@stage_check("denoise_latents", "soundini")
def _check(ctx: PreflightContext) -> None:
    """Refuses, before any model loads, a CLIP space of another width than the audio encoder's (512), and a UNet that
    does not predict noise (the guidance shift is in epsilon form)."""
    config = ctx.model_config("clip") or {}
    width = config.get("projection_dim", (config.get("vision_config") or {}).get("projection_dim", 512))
    if width != 512:
        raise ValueError(f"the clip role's image embeddings are {width}-wide but the audio encoders embed into CLIP "
                         "ViT-B/32's 512-wide space; use openai/clip-vit-base-patch32")  # fmt: skip
    scheduler = ctx.model_config("unet", "scheduler", "scheduler_config.json") or {}
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"the UNet predicts {scheduler['prediction_type']!r}; Soundini's guidance here takes an "
                         "epsilon-prediction model (SD 1.5)")  # fmt: skip
