"""embed_content (text, reference, ip_adapter), invert_latents and denoise_latents (gen1, gen1_controlnet):
Gen-1 style editing from a clip's stored depth, window by window, every window's cross-frame attention
also reading one anchor frame."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reelflow.core.attention.ip_adapter import ip_adapter
from reelflow.core.attention.processor import install_frame_processors
from reelflow.core.editing.gen1 import Blend, Structure, edit_timesteps, gen1_denoise, gen1_invert, sdedit_start
from reelflow.core.guidance.structure import structure_level
from reelflow.core.sources import read_image
from reelflow.core.text import encode_prompts
from reelflow.core.windows import Window, WindowPlan
from reelflow.schemas.calls import StageCall
from reelflow.schemas.errors import ModelError
from reelflow.schemas.gen1 import (
    Gen1Inversion,
    Gen1InvertParams,
    Gen1Params,
    IPAdapterContent,
    ReferenceContent,
    TextContent,
)
from reelflow.schemas.kinds import Latents
from reelflow.schemas.refs import ArtifactRef
from reelflow.tasks.artifacts import contact_sheet, fit, spread
from reelflow.tasks.frames import decoded_frames, frame_labels
from reelflow.tasks.models import model_lock
from reelflow.tasks.preflight import PreflightContext, stage_check
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task
from reelflow.tasks.windows import read_window, run_windows

ANCHOR = 0  # the frame every window's video-mode attention also reads
SHOWN_FRAMES = 8  # frames of the structure picture


@stage_task("embed_content", "text")
def embed_content(call: StageCall) -> ArtifactRef:
    """Prompt embeddings ``embeds (2, L, D)`` (the negative prompt's, then the prompt's) and the empty prompt's
    ``empty (1, L, D)`` (what an inversion is conditioned on)."""
    return run_stage(call, _embed)


def _embed(ctx: StageContext) -> TextContent:
    p = ctx.call.stage.params
    _write_prompts(ctx, p.prompt, p.negative_prompt)
    return TextContent(prompt=p.prompt, negative_prompt=p.negative_prompt)


EMBED_DIMS = ("prompt", "token", "embedding")


def _write_prompts(ctx: StageContext, prompt: str, negative_prompt: str) -> None:
    embeds = encode_prompts(ctx.model("text_encoder", "tokenizer"), ctx.model("text_encoder"), [negative_prompt, prompt, ""])
    ctx.writer.write_array("embeds", embeds[:2].float().cpu().numpy(), dims=EMBED_DIMS, dtype=np.float32)
    ctx.writer.write_array("empty", embeds[2:].float().cpu().numpy(), dims=EMBED_DIMS, dtype=np.float32)


def _write_reference(ctx: StageContext, encoder: Any, processor: Any) -> tuple[np.ndarray, torch.Tensor]:
    """The reference image (also stored, ``image (y, x, rgb)``) and its CLIP image embedding ``(1, 1, E)``."""
    with ctx.open_source("reference") as handle:
        image = read_image("reference", handle)
    pixels = processor(images=Image.fromarray(image), return_tensors="pt").pixel_values
    with torch.inference_mode():
        embedding = encoder(pixels.to(encoder.device, encoder.dtype)).image_embeds.float().cpu()[:, None]
    ctx.writer.write_array("image", image, dims=("y", "x", "rgb"))
    return image, embedding


@stage_task("embed_content", "reference")
def embed_reference(call: StageCall) -> ArtifactRef:
    """The reference image's CLIP embedding as one cross-attention token, ``embeds (2, 1, D)`` (zeros, then the
    embedding: the image-variation UNet's unconditional input is zeros) and ``empty (1, 1, D)`` (zeros)."""
    return run_stage(call, _embed_reference)


def _embed_reference(ctx: StageContext) -> ReferenceContent:
    image, embedding = _write_reference(ctx, ctx.model("image_encoder"), ctx.model("image_encoder", "feature_extractor"))
    ctx.writer.write_array("embeds", torch.cat([torch.zeros_like(embedding), embedding]).numpy(), dims=EMBED_DIMS, dtype=np.float32)
    ctx.writer.write_array("empty", torch.zeros_like(embedding).numpy(), dims=EMBED_DIMS, dtype=np.float32)
    return ReferenceContent(image_size=(image.shape[1], image.shape[0]), embedding_dim=int(embedding.shape[-1]))


@stage_task("embed_content", "ip_adapter")
def embed_ip_adapter(call: StageCall) -> ArtifactRef:
    """Prompt embeddings as method ``text`` writes them, and the reference image's CLIP image embedding for an
    IP-Adapter, ``image_embeds (2, 1, E)`` (zeros, the unconditional input as diffusers gives it, then the embedding)."""
    return run_stage(call, _embed_ip_adapter)


def _embed_ip_adapter(ctx: StageContext) -> IPAdapterContent:
    p = ctx.call.stage.params
    encoder, adapter = ctx.model("ip_adapter", "image_encoder"), ctx.model("ip_adapter")
    if encoder.config.projection_dim != adapter.image_embed_dim:
        raise ModelError(f"IP-Adapter {ctx.call.models['ip_adapter'].weight_name} takes {adapter.image_embed_dim}-wide image "
                         f"embeddings but the image_encoder/ beside it gives {encoder.config.projection_dim} (the SD 1.5 "
                         "vit-G adapters want the encoder in sdxl_models/); pick an adapter trained on the encoder "
                         "beside it, such as models/ip-adapter_sd15.safetensors")  # fmt: skip
    _write_prompts(ctx, p.prompt, p.negative_prompt)
    image, embedding = _write_reference(ctx, encoder, ctx.model("ip_adapter", "feature_extractor"))
    ctx.writer.write_array("image_embeds", torch.cat([torch.zeros_like(embedding), embedding]).numpy(),
                           dims=("prompt", "image", "embedding"), dtype=np.float32)  # fmt: skip
    return IPAdapterContent(prompt=p.prompt, negative_prompt=p.negative_prompt, image_size=(image.shape[1], image.shape[0]),
                            embedding_dim=int(embedding.shape[-1]))  # fmt: skip


@stage_task("denoise_latents", "gen1")
def denoise_latents(call: StageCall) -> ArtifactRef:
    """Edited latents ``(F, 4, h, w)`` under the clip's depth, concatenated to a depth UNet's input. Resumable by window."""
    return run_stage(call, _denoise, resumable=True)


@stage_task("denoise_latents", "gen1_controlnet")
def denoise_latents_controlnet(call: StageCall) -> ArtifactRef:
    """Edited latents ``(F, 4, h, w)`` under the clip's depth, through a depth ControlNet. Resumable by window."""
    return run_stage(call, _denoise, resumable=True)


def _denoise(ctx: StageContext) -> Latents:
    p: Gen1Params = ctx.call.stage.params
    latents, depth = ctx.input("latents")["latents"], ctx.input("depth")["depth"]
    embeds = torch.from_numpy(ctx.array("content", "embeds", "float32"))
    unet, scheduler = ctx.model("unet"), ctx.model("unet", "scheduler", cls="DDIMScheduler")
    controlnet = ctx.model("controlnet") if "controlnet" in ctx.call.stage.roles else None
    adapter = ctx.model("ip_adapter") if "ip_adapter" in ctx.call.models else None
    image_embeds = torch.from_numpy(ctx.array("content", "image_embeds", "float32")) if adapter is not None else None
    timesteps = edit_timesteps(scheduler, p.num_steps, p.strength)
    out = ctx.writer.create_array("latents", shape=latents.shape, dtype=np.float32, dims=("frame", "latent_channel", "y", "x"))
    # The structure level acts where the UNet reads depth: on the latent grid for a depth UNet, at frame size for a ControlNet.
    size = None if controlnet is not None else tuple(latents.shape[-2:])
    span = _write_levelled(ctx, depth, p.t_s, size)

    mask = _mask(ctx, tuple(latents.shape[-2:]))
    ctx.steps.start(len(timesteps), "denoising (first window computed)")

    def compute(window: Window) -> np.ndarray:
        z0 = torch.from_numpy(read_window(latents, window).astype(np.float32))
        levelled = condition_depth(torch.from_numpy(read_window(depth, window).astype(np.float32)), p.t_s, size)
        structure = Structure(levelled, controlnet, p.conditioning_scale, span)
        z, source = _start(ctx, window, z0, scheduler, timesteps)
        edited = gen1_denoise(unet, z, embeds, structure, scheduler, p.num_steps, timesteps, omega=p.omega,
                              omega_t=p.omega_t, blend=Blend(mask, source) if mask is not None else None,
                              image_embeds=image_embeds,
                              on_step=lambda i, t, x: ctx.steps.keep(i, x, f"step {i + 1} · t={int(t)}", part=window.index))  # fmt: skip
        return edited.numpy()  # on window.frames, the anchor first; the stitcher keeps the window's own

    with _video_mode(unet, p.frame_keys, adapter, p.ip_adapter_scale):
        run_windows(ctx, WindowPlan(p.window, p.overlap, anchor=ANCHOR), out, compute)
    _publish(ctx, p, span)
    ctx.record(timesteps=[int(t) for t in timesteps])
    return Latents()


def _start(
    ctx: StageContext, window: Window, z0: torch.Tensor, scheduler: Any, timesteps: torch.Tensor
) -> tuple[torch.Tensor, Callable[[int, float], torch.Tensor]]:  # fmt: skip
    """The latents the window's edit starts from, and the source's latents at each level it reaches (for
    blending): the stored inversion's when the stage reads one, else the SDEdit trajectory of seeded noise."""
    if "inversion" in ctx.call.inputs:
        levels = ctx.input("inversion")["levels"]
        count = levels.shape[0]
        at = lambda k: torch.from_numpy(_window_level(levels, k, window))  # noqa: E731
        return at(count - 1), lambda index, alpha_prod: at(count - 2 - index)
    noise = _noise(ctx.call.seed, window.frames, z0.shape[1:])
    last = len(timesteps) - 1  # after the last step the source is its clean latents, as diffusers' inpainting
    start = sdedit_start(z0, noise, float(scheduler.alphas_cumprod[timesteps[0]]))
    return start, lambda index, alpha_prod: z0 if index == last else sdedit_start(z0, noise, alpha_prod)


def _window_level(levels: Any, k: int, window: Window) -> np.ndarray:
    """Level ``k`` of a stored inversion ``(K+1, F, 4, h, w)`` on ``window.frames`` (the anchor first)."""
    own = np.asarray(levels[k, window.start : window.stop], np.float32)
    if window.anchor is None:
        return own
    return np.concatenate([np.asarray(levels[k, window.anchor : window.anchor + 1], np.float32), own])


@stage_task("invert_latents", "gen1")
def invert_latents(call: StageCall) -> ArtifactRef:
    """DDIM inversion under the clip's depth, ``levels (K+1, F, 4, h, w)`` (clean first). Resumable by chunk."""
    return run_stage(call, _invert, resumable=True)


@stage_task("invert_latents", "gen1_controlnet")
def invert_latents_controlnet(call: StageCall) -> ArtifactRef:
    """DDIM inversion under the clip's depth through a ControlNet, ``levels (K+1, F, 4, h, w)``. Resumable by chunk."""
    return run_stage(call, _invert, resumable=True)


def _invert(ctx: StageContext) -> Gen1Inversion:
    p: Gen1InvertParams = ctx.call.stage.params
    latents, depth = ctx.input("latents")["latents"], ctx.input("depth")["depth"]
    empty = torch.from_numpy(ctx.array("content", "empty", "float32"))
    unet, scheduler = ctx.model("unet"), ctx.model("unet", "scheduler", cls="DDIMScheduler")
    controlnet = ctx.model("controlnet") if "controlnet" in ctx.call.stage.roles else None
    timesteps = edit_timesteps(scheduler, p.num_steps, p.strength)
    size = None if controlnet is not None else tuple(latents.shape[-2:])
    span = _span(depth, p.t_s, size)
    count = latents.shape[0]
    levels = ctx.writer.create_array("levels", shape=(len(timesteps) + 1, *latents.shape), dtype=np.float32,
                                     dims=("level", "frame", "latent_channel", "y", "x"),
                                     chunks=(1, min(count, p.chunk_size), *latents.shape[1:]))  # fmt: skip
    ctx.progress.start(count, unit="frames")
    ctx.steps.start(len(timesteps), "DDIM inversion (first frames computed)")
    # Per-frame processors, held under the model lock: each frame is inverted alone (image mode).
    with _video_mode(unet, ("self",)):
        for start in range(0, count, p.chunk_size):
            stop = min(start + p.chunk_size, count)
            if not ctx.writer.is_done(f"frames-{start}"):
                z0 = torch.from_numpy(np.asarray(latents[start:stop], np.float32))
                levelled = condition_depth(torch.from_numpy(np.asarray(depth[start:stop], np.float32)), p.t_s, size)
                walked = gen1_invert(unet, z0, empty, Structure(levelled, controlnet, p.conditioning_scale, span),
                                     scheduler, p.num_steps, timesteps)  # fmt: skip
                levels[:, start:stop] = torch.stack(walked).numpy()
                for k, (t, level) in enumerate(zip(timesteps.flip(0), walked[1:])):
                    ctx.steps.keep(k, level, f"step {k + 1} · t={int(t)}", part=start)
                ctx.writer.mark_done(f"frames-{start}")
            ctx.progress.advance(stop - start)
    return Gen1Inversion(num_steps=p.num_steps, strength=p.strength, timesteps=[int(t) for t in timesteps.flip(0)], t_s=p.t_s)


def _span(depth: Any, t_s: int, size: tuple[int, int] | None) -> tuple[float, float]:
    """The clip's depth range as the UNet reads it (structure level ``t_s``, on ``size``), a chunk at a time."""
    low, high = float("inf"), float("-inf")
    for _, levelled in _levelled_chunks(depth, t_s, size):
        low, high = min(low, float(levelled.min())), max(high, float(levelled.max()))
    return low, high


def _levelled_chunks(depth: Any, t_s: int, size: tuple[int, int] | None) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, depth as the UNet reads it)`` for 16 frames at a time, so memory stays flat with the clip."""
    for start in range(0, depth.shape[0], 16):
        yield start, condition_depth(torch.from_numpy(np.asarray(depth[start : start + 16], np.float32)), t_s, size)


def _mask(ctx: StageContext, latent_size: tuple[int, int]) -> torch.Tensor | None:
    """The optional mask (white: edit) averaged onto the latent grid, ``(1, 1, h, w)``: give it at the size of
    the frames the pipeline decodes (it is squashed, not cropped)."""
    if "mask" not in ctx.call.sources:
        return None
    with ctx.open_source("mask") as handle:
        mask = torch.from_numpy(read_image("mask", handle, mask=True))[None, None]
    return F.interpolate(mask, size=latent_size, mode="area").clamp(0.0, 1.0)


@contextmanager
def _video_mode(unet: Any, frame_keys: tuple, adapter: Any = None, scale: float = 1.0) -> Iterator[None]:
    """The shared UNet with cross-frame self-attention (and an IP-Adapter on its cross-attention) for the stage,
    as it was restored after."""
    with model_lock(unet), ip_adapter(unet, adapter, scale) if adapter is not None else nullcontext():
        original = dict(unet.attn_processors)
        install_frame_processors(unet, frame_keys=frame_keys, cross_attention=False)
        try:
            yield
        finally:
            unet.set_attn_processor(original)


def _noise(seed: int, frames: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """SDEdit noise of each source frame, the same in every window that holds the frame (the anchor too)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + f)) for f in frames])


def condition_depth(depth: torch.Tensor, t_s: int, size: tuple[int, int] | None) -> torch.Tensor:
    """``depth`` ``(F, H, W)`` averaged onto ``size`` (the latent grid; None keeps it) and degraded to level ``t_s``."""
    if size is not None and tuple(depth.shape[-2:]) != size:
        depth = F.interpolate(depth[:, None], size=size, mode="area")[:, 0]
    return structure_level(depth, t_s)


def _write_levelled(ctx: StageContext, depth: Any, t_s: int, size: tuple[int, int] | None) -> tuple[float, float]:
    """The clip's depth as the UNet reads it (at structure level ``t_s``, on ``size``), ``structure (F, h, w)``,
    a chunk at a time; returns its range over the clip (the concat condition maps it to [-1, 1])."""
    out = ctx.writer.create_array("structure", shape=(depth.shape[0], *(size or depth.shape[1:])), dtype=np.float16,
                                  dims=("frame", "y", "x"))  # fmt: skip
    for start, levelled in _levelled_chunks(depth, t_s, size):
        out[start : start + len(levelled)] = levelled.numpy()
    span = _span(depth, t_s, size)
    ctx.record(structure_range=list(span))
    return span


def _publish(ctx: StageContext, p: Gen1Params, span: tuple[float, float]) -> None:
    """The depth the UNet read at structure level t_s, under the source frames it came from."""
    structure, (low, high) = ctx.writer.group["structure"], span
    shown = spread(structure.shape[0], SHOWN_FRAMES)
    levelled = (np.asarray(structure.oindex[shown], np.float32) - low) / max(high - low, 1e-12)
    source = decoded_frames(ctx.store, ctx.input("latents"))
    key = f"depth at structure level {p.t_s}, its clip range [{low:.3g}, {high:.3g}] drawn as [0, 1]"
    if source is not None and source["frames"].shape[0] == structure.shape[0]:
        frames = np.asarray(source["frames"].oindex[shown])
        sheet = contact_sheet(frames, [fit(levelled, frames.shape[1:3])], labels=frame_labels(ctx.store, source, shown), key=key)
    else:
        sheet = contact_sheet(levelled, labels=[f"#{i}" for i in shown], key=key)
    picture = ctx.picture(f"structure-t{p.t_s}", sheet)
    ctx.publish((
        f"t_s {p.t_s}, omega {p.omega}, omega_t {p.omega_t}, strength {p.strength}\n\n"
        f"**depth at structure level {p.t_s}** under the frames it came from\n\n{picture}"))  # fmt: skip


@stage_check("invert_latents", "gen1")
@stage_check("denoise_latents", "gen1")
def _check_depth_unet(ctx: PreflightContext) -> None:
    """Refuses, before any model loads, a UNet that does not take depth as an input channel."""
    config = ctx.model_config("unet") or {}
    if config.get("in_channels", 5) != 5:
        raise ValueError(f"method gen1 concatenates depth to the latents, so its UNet needs 5 input channels (a depth "
                         f"UNet such as stabilityai/stable-diffusion-2-depth); this one has {config['in_channels']}: "
                         "use method gen1_controlnet with a depth ControlNet for a 4-channel UNet")  # fmt: skip
    _check_scheduler(ctx)
    _check_mask(ctx)


@stage_check("invert_latents", "gen1_controlnet")
@stage_check("denoise_latents", "gen1_controlnet")
def _check_controlnet(ctx: PreflightContext) -> None:
    config = ctx.model_config("controlnet") or {}
    if config and config.get("_class_name") != "ControlNetModel":
        raise ValueError(f"the controlnet role needs a ControlNetModel; its config names {config.get('_class_name')!r}")
    _check_scheduler(ctx)
    _check_mask(ctx)


def _check_mask(ctx: PreflightContext) -> None:
    if ctx.spec.stage == "denoise_latents" and ctx.has_source("mask") and ctx.source("mask").num_frames != 1:
        raise ValueError("Gen-1 blends outside one mask image for every frame; this mask source holds "
                         f"{ctx.source('mask').num_frames} masks (a folder or a video): give one PNG")  # fmt: skip


def _check_scheduler(ctx: PreflightContext) -> None:
    config = ctx.model_config("unet", "scheduler", "scheduler_config.json") or {}
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"the UNet predicts {config['prediction_type']!r}; Gen-1's DDIM sampling here takes "
                         "epsilon-prediction models (stable-diffusion-2-depth, SD 1.5)")  # fmt: skip
