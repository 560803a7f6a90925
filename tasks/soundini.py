"""denoise_latents (soundini): the masked region re-rendered to follow the sound (or a prompt: embed_content
clip_text), on guided-diffusion's pixel-space ADM or on SD 1.5 latents, resumable by step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from reelflow.core.audio.perception import VIDEO_TOWERS, image_embeddings, image_width
from reelflow.core.editing.gen1 import edit_timesteps
from reelflow.core.editing.soundini import Region, soundini_denoise
from reelflow.core.frames import from_model_range, to_model_range
from reelflow.core.guidance.sound import background_l1, direction_loss, flow_loss, ramp, range_loss, sound_loss
from reelflow.core.models.guided_diffusion_family import adm_config
from reelflow.core.text import encode_prompts, projected_text
from reelflow.core.vae import decode_latents
from reelflow.schemas.calls import StageCall
from reelflow.schemas.errors import SpecError
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
    """Edited ``frames (F, H, W, 3)`` (uint8, the source's background pasted outside the mask); on the latent backbone
    also their ``latents (F, 4, h, w)`` before decoding. Resumable by step: the last two finished steps are kept in
    ``state (2, F, C, h, w)`` (frames in [-1, 1] on the pixel backbone, latents on SD), step ``i`` in slot ``i % 2``,
    so a kill mid-write leaves the step before it whole."""
    return run_stage(call, _denoise, resumable=True)


@dataclass(frozen=True)
class Backbone:
    """What the sampler denoises: the source there, ``(F, C, h, w)`` float32; the VAE that decodes it to frames (None:
    it is the frames, in [-1, 1]); the UNet's prompt embedding (None: an unconditional UNet); its channel axis's name."""

    source: np.ndarray
    vae: Any
    embeds: torch.Tensor | None
    channel: str

    def frames(self, z: torch.Tensor) -> np.ndarray:
        """uint8 ``(n, H, W, 3)`` frames of ``z``."""
        if self.vae is None:
            return from_model_range(z)
        with torch.inference_mode():
            return from_model_range(decode_latents(self.vae, z, chunk_size=len(z)))


def _backbone(ctx: StageContext, p: SoundiniParams, frames: Any) -> Backbone:
    if p.backbone == "pixel":
        return Backbone(_model_range(frames, p.chunk), None, None, "channel")
    embeds = encode_prompts(ctx.model("text_encoder", "tokenizer"), ctx.model("text_encoder"), [""])[:1]
    return Backbone(np.asarray(ctx.input("latents")["latents"][:], np.float32), ctx.model("vae"), embeds, "latent_channel")


def _denoise(ctx: StageContext) -> NoAttrs:
    p: SoundiniParams = ctx.call.stage.params
    frames, masks = ctx.input("frames")["frames"], ctx.input("mask")["mask"]
    target = torch.from_numpy(ctx.array("target", "embeddings", "float32"))
    _check_target(ctx, target)  # before any model loads
    backbone = _backbone(ctx, p, frames)
    count, shape = backbone.source.shape[0], tuple(backbone.source.shape[1:])
    audio = target.expand(count, -1) if ctx.call.inputs["target"].kind == "content/clip_text" else target  # a prompt: all
    flows = {name: ctx.input("flow")[name] for name in ("forward", "backward", "occluded_forward", "occluded_backward")}
    unet, scheduler = ctx.model("unet"), ctx.model("unet", "scheduler", cls="DDIMScheduler")
    region = Region(_latent_masks(masks, shape[-2:], p.chunk), torch.from_numpy(backbone.source), _noise(ctx.call.seed, count, shape))
    timesteps = edit_timesteps(scheduler, p.num_steps, p.strength)
    state = ctx.writer.create_array("state", shape=(2, *backbone.source.shape), dtype=np.float32,
                                    dims=("slot", "frame", backbone.channel, "y", "x"), chunks=(1, *backbone.source.shape))  # fmt: skip
    done = [i for i in range(len(timesteps)) if ctx.writer.is_done(f"step-{i}")]
    first = done[-1] + 1 if done else 0
    z = torch.from_numpy(np.asarray(state[(first - 1) % 2], np.float32)) if done else region.noised(
        slice(None), float(scheduler.alphas_cumprod[timesteps[0]]))  # fmt: skip
    lpips = ctx.model("lpips") if p.perceptual else None
    losses = _losses(p, frames, masks, audio, flows, _image_embedder(ctx), lpips, ctx.call.seed,
                     max(1, round(p.ramp * len(timesteps))))  # fmt: skip

    def keep(i: int, latents: torch.Tensor) -> None:
        state[(first + i) % 2] = latents.numpy()
        ctx.steps.keep(first + i, latents, f"step {first + i + 1} · t={int(timesteps[first + i])}")
        ctx.writer.mark_done(f"step-{first + i}")
        ctx.progress.advance(1)

    ctx.progress.start(len(timesteps) - first)
    ctx.steps.start(len(timesteps), "guided denoising")
    with model_lock(unet):
        z = soundini_denoise(unet, backbone.vae, z, backbone.embeds, scheduler, p.num_steps, timesteps[first:], region, losses,
                             chunk=p.chunk, on_step=keep, first_step=first)  # fmt: skip
    if backbone.vae is not None:
        ctx.writer.write_array("latents", z.numpy(), dims=("frame", "latent_channel", "y", "x"), dtype=np.float32)
    out = ctx.writer.create_array("frames", shape=frames.shape, dtype=np.uint8, dims=("frame", "y", "x", "rgb"))
    for start in range(0, count, p.chunk):
        part = slice(start, min(start + p.chunk, count))
        inside = np.asarray(masks[part])[..., None]
        out[part] = np.where(inside, backbone.frames(z[part]), np.asarray(frames[part]))  # the source's background, pasted back
    return NoAttrs()


def _check_target(ctx: StageContext, target: torch.Tensor) -> None:
    """The target's embeddings must live where the clip role embeds images: as wide, and, for a Perception Encoder,
    from the very model (the width of one PE space is the width of another)."""
    config = ctx.model_config("clip") or {}
    width = image_width(config)
    if target.shape[1] != width:
        raise SpecError(f"stage {ctx.call.stage_id!r}: the target's embeddings are {target.shape[1]}-wide but the clip "
                        f"role embeds images {width}-wide; give it an image model of the target's space (CLIP "
                        "ViT-B/32 for the CLIP-aligned audio encoders, the audio's own Perception Encoder for PE)")  # fmt: skip
    encoder, clip = ctx.input("target").attrs.get("encoder"), ctx.call.models["clip"].fingerprint
    if config.get("model_type") in VIDEO_TOWERS and encoder is not None and encoder != clip:
        raise SpecError(f"stage {ctx.call.stage_id!r}: the sound was embedded by another Perception Encoder ({encoder}) "
                        f"than the clip role's ({clip}); their spaces differ: give embed_audio and this stage the same "
                        "model")  # fmt: skip


def _model_range(frames: Any, chunk: int) -> np.ndarray:
    """The frames as the pixel model sees them, ``(F, 3, H, W)`` float32 in [-1, 1], a chunk at a time."""
    return np.concatenate([to_model_range(np.asarray(frames[s : s + chunk])).numpy() for s in range(0, frames.shape[0], chunk)])


def _latent_masks(masks: Any, size: tuple[int, int], chunk: int) -> torch.Tensor:
    """The region on the model's grid, ``(F, 1, h, w)``: a latent cell is inside when any of its pixels is (max-pooled;
    on the pixel grid, the mask itself), a chunk at a time."""
    parts = [F.adaptive_max_pool2d(torch.from_numpy(np.asarray(masks[s : s + chunk], np.float32))[:, None], size)
             for s in range(0, masks.shape[0], chunk)]  # fmt: skip
    return torch.cat(parts)


def _noise(seed: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """One noise for every frame (the reference repeats one sample across frames), from the pipeline seed."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).expand(count, *shape)


def _losses(p: SoundiniParams, frames: Any, masks: Any, audio: torch.Tensor, flows: dict[str, Any], clip: Any, lpips: Any,
            seed: int, ramp_steps: int):  # noqa: ANN202
    """``losses(pixels, frames seen, anchored, step)``: the weighted sum of per-frame terms the sampler descends. The
    fixed neighbour (``anchored``: the first of ``pixels``) counts only in the terms that link it to the chunk
    (direction, flow); its own terms belong to its own chunk. What the terms read of the store (masks, flows, the
    source frames) is read once here, not at every step of every chunk."""
    regions = torch.from_numpy(np.asarray(masks[:], np.float32))[:, None]
    fields = {name: torch.from_numpy(np.asarray(array[:])) for name, array in flows.items()} if p.flow else {}
    originals = torch.from_numpy(_model_range(frames, p.chunk)) if p.background or p.perceptual else None

    def losses(pixels: torch.Tensor, seen: slice, anchored: bool, step: int) -> torch.Tensor:
        region = regions[seen].to(pixels)
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
            total = total + p.flow * weight * flow_loss(pixels, fields["forward"][pairs].to(pixels), fields["backward"][pairs].to(pixels),
                                                        region, fields["occluded_forward"][pairs],
                                                        fields["occluded_backward"][pairs]).sum()  # fmt: skip
        if originals is not None:
            original = originals[seen].to(pixels)
            if p.background:
                total = total + p.background * weight * background_l1(pixels, original, region)[own].sum()
            if p.perceptual:  # the backgrounds alone: the source's region is what the edit replaces
                outside = 1.0 - region
                parameter = next(lpips.parameters())
                distance = lpips((outside * pixels)[own].to(parameter.device, parameter.dtype),
                                 (outside * original)[own].to(parameter.device, parameter.dtype))  # fmt: skip
                total = total + p.perceptual * weight * distance.to(pixels).sum()
        if p.range:
            total = total + p.range * range_loss(pixels)[own].sum()
        return total

    return losses


@dataclass(frozen=True)
class ImageEmbedder:
    """The image side of the shared space: ``embed(images (N, 3, size, size) in [0, 1]) -> (N, D)``, differentiable."""

    embed: Callable[[torch.Tensor], torch.Tensor]
    size: int


def _image_embedder(ctx: StageContext) -> ImageEmbedder:
    """CLIP's image tower with projection (the space of the CLIP-aligned audio encoders), or a Perception Encoder
    audio-visual model's video tower, each frame a one-frame video (the space of its audio tower), by the model's
    ``model_type``."""
    if (ctx.model_config("clip") or {}).get("model_type") in VIDEO_TOWERS:
        model, processor = ctx.model("clip"), ctx.model("clip", "processor")
        video = getattr(processor, "video_processor", processor)
        size = dict(video.crop_size if video.do_center_crop else video.size)
        return ImageEmbedder(lambda images: image_embeddings(model, images, processor).float(), int(size.get("height") or 224))
    clip = ctx.model("clip", cls="CLIPVisionModelWithProjection")
    parameter = next(clip.parameters())

    def embed(images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return clip(pixel_values=((images - mean) / std).to(parameter.device, parameter.dtype)).image_embeds.float()

    return ImageEmbedder(embed, clip.config.image_size)


def _clip_views(clip: ImageEmbedder, pixels: torch.Tensor, views: int, seed: int) -> torch.Tensor:
    """Image embeddings of ``views`` views of each frame, ``(views * n, D)`` view-major: the first as it is, the
    others each frame on its own randomly rotated and shifted (p = 0.7) and warped in perspective (p = 0.7), as the
    reference's kornia augmentations (which pad with the border; torchvision pads with zeros here: its fill is done
    in place, which autograd cannot follow)."""
    size = clip.size
    images = F.interpolate((pixels + 1.0) / 2.0, size=(size, size), mode="bilinear", align_corners=False)
    augment = v2.Compose([v2.RandomApply([v2.RandomAffine(degrees=15, translate=(0.1, 0.1), fill=None)], p=0.7),
                          v2.RandomPerspective(0.7, p=0.7, fill=None)])  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = torch.cat([images, *(torch.cat([augment(image[None]) for image in images]) for _ in range(views - 1))])
    return clip.embed(batch)


@stage_task("embed_content", "clip_text")
def embed_clip_text(call: StageCall) -> ArtifactRef:
    """The prompt's projected CLIP text embedding, ``embeddings (1, D)``: Soundini's text-guided target."""
    return run_stage(call, _embed_text)


def _embed_text(ctx: StageContext) -> ClipText:
    prompt = ctx.call.stage.params.prompt
    embedding = projected_text(ctx.model("clip", "tokenizer"), ctx.model("clip", cls="CLIPTextModelWithProjection"), [prompt])
    ctx.writer.write_array("embeddings", embedding.numpy(), dims=("prompt", "embedding"), dtype=np.float32)
    return ClipText(prompt=prompt)


@stage_check("denoise_latents", "soundini")
def _check(ctx: PreflightContext) -> None:
    """Refuses, before any model loads: a UNet of the other backbone (a pixel model asked to denoise SD latents, an
    SD UNet asked to denoise frames), frames the pixel model cannot halve down to its deepest level, a CLIP image
    model outside the audio encoders' 512-wide space, and a UNet that does not predict noise (the guidance shift is
    in epsilon form)."""
    backbone = ctx.spec.params.backbone
    channels, downscale = _unet_input(ctx)
    if backbone == "pixel" and channels != 3:
        raise ValueError(f"the unet takes {channels} channels, not pixels: for SD set `backbone: latent` (with "
                         "`latents: encode_latents`); the pixel backbone takes guided-diffusion's ADM")  # fmt: skip
    if backbone == "latent" and channels == 3:
        raise ValueError("the unet is a pixel-space model, which cannot denoise SD latents: set `backbone: pixel` and "
                         "drop the `latents` input")  # fmt: skip
    frames = ctx.input("frames")
    if backbone == "pixel" and frames is not None and (frames.width % downscale or frames.height % downscale):
        raise ValueError(f"the pixel model halves the frames {downscale.bit_length() - 1} times, so both sides must "
                         f"divide by {downscale}, but they are {frames.width}x{frames.height}; set decode_video's "
                         f"`multiple: {downscale}`")  # fmt: skip
    _check_shared_space(ctx)
    scheduler = ctx.model_config("unet", "scheduler", "scheduler_config.json") or {}
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"the UNet predicts {scheduler['prediction_type']!r}; Soundini's guidance here takes an "
                         "epsilon-prediction model (SD 1.5, guided-diffusion's ADM)")  # fmt: skip


def _unet_input(ctx: PreflightContext) -> tuple[int, int]:
    """The unet's input channels and how many times each side of its input must divide (one halving per level)."""
    if ctx.model_family("unet") == "guided_diffusion":
        return 3, adm_config(ctx.model_config("unet") or {}).downscale
    config = ctx.model_config("unet") or {}
    return int(config.get("in_channels", 4)), 2 ** (len(config.get("block_out_channels", (0,))) - 1)


def _check_shared_space(ctx: PreflightContext) -> None:
    """A CLIP image model must embed into CLIP ViT-B/32's 512-wide space, the CLIP-aligned audio encoders' (a
    Perception Encoder's images are checked against its audio's width when the stage starts: the target's model is
    its producer's, which this check cannot see)."""
    config = ctx.model_config("clip") or {}
    if config.get("model_type") in VIDEO_TOWERS:
        return
    width = image_width(config)
    if width != 512:
        raise ValueError(f"the clip role's image embeddings are {width}-wide but the audio encoders embed into CLIP "
                         "ViT-B/32's 512-wide space; use openai/clip-vit-base-patch32")  # fmt: skip
