"""embed_content (wan_text), invert_latents (flowmatch), denoise_latents (wan-propagate, vace): editing on Wan 2.x.

Every stage works window by window on the windows ``encode_latents`` (wan) cut, each window holding the
transformer's frame count. The inversion stores every step of every window (``steps``, level 0 the clean
latents) and resumes from the last stored step; both edits store every window as a part, give each window
after the first the previous window's output on the frames they share (the image-to-video condition, or
VACE's known frames), and resume at the first missing window.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from reelflow.core.editing.videoshop import normalise_latents, rescale_latents
from reelflow.core.frames import to_model_range
from reelflow.core.guidance.structure import structure_level
from reelflow.core.models import is_offloaded
from reelflow.core.inversion.flowmatch import FlowSchedule, generate, generate_scheduled, invert
from reelflow.core.sources import read_image
from reelflow.core.wan import BoundaryVelocity, WanVelocity, checkpoint_kind, encode_prompts, i2v_condition, image_states, vace_control
from reelflow.core.windows import Window
from reelflow.schemas.calls import StageCall
from reelflow.schemas.errors import ArtifactMismatch
from reelflow.schemas.refs import ArtifactRef
from reelflow.schemas.wan import (
    EmbedWanTextParams,
    FlowInversion,
    FlowInvertParams,
    VaceParams,
    WanLatents,
    WanPropagateParams,
    WanText,
)
from reelflow.tasks.artifacts import bar_chart, contact_sheet, spread
from reelflow.tasks.models import model_lock
from reelflow.tasks.preflight import PreflightContext, stage_check
from reelflow.tasks.propagation import InversionStore, PropagationStore, resize_like, seeded_generator
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task
from reelflow.tasks.wan import LATENT_DIMS, check_vae, decode_window, window_video, windows_of
from reelflow.tasks.windows import run_windows

ARTICLE = {"i2v": "an", "vace": "a"}


# embed_content (wan_text) --------------------------------------------------------------------


@stage_task("embed_content", "wan_text")
def embed_content(call: StageCall) -> ArtifactRef:
    """UMT5 states ``prompt_embeds (2, L, D)`` float32: the negative prompt's, then the prompt's."""
    return run_stage(call, _embed_text)


def _embed_text(ctx: StageContext) -> WanText:
    p: EmbedWanTextParams = ctx.call.stage.params
    encoder, tokenizer = ctx.model("text_encoder"), ctx.model("text_encoder", "tokenizer")
    with model_lock(encoder):  # its offloading hooks, where set, move shared weights
        states = encode_prompts(encoder, tokenizer, [p.negative_prompt, p.prompt], p.max_sequence_length)
    ctx.writer.write_array("prompt_embeds", states.numpy(), dims=("prompt", "token", "embedding"), dtype=np.float32)
    ctx.publish(f"**prompt** {p.prompt!r}, negative {p.negative_prompt!r}: "
                f"{int(states[1].abs().sum(-1).gt(0).sum())} tokens of {p.max_sequence_length}")  # fmt: skip
    return WanText(prompt=p.prompt, negative_prompt=p.negative_prompt, max_sequence_length=p.max_sequence_length)


# shared --------------------------------------------------------------------------------------


@dataclass
class _Wan:
    """The Wan components one stage uses (the image encoder and its processor only where the transformer reads
    CLIP image tokens)."""

    transformer: Any
    vae: Any
    scheduler: Any
    image_encoder: Any = None
    processor: Any = None
    low_noise: Any = None  # Wan 2.2 A14B's transformer_2, below the boundary timestep
    boundary: float | None = None

    def velocity(self, prompts: torch.Tensor, guidance_scale: float, guidance_scale_2: float | None = None,
                 **condition: Any) -> WanVelocity | BoundaryVelocity:  # fmt: skip
        """The guided velocity field (both experts of Wan 2.2 A14B, the second with ``guidance_scale_2``)."""
        negative, prompt = prompts[:1], prompts[1:]
        high = WanVelocity(self.transformer, prompt, negative, guidance_scale=guidance_scale, **condition)
        if self.low_noise is None:
            return _one_at_a_time(high, self.transformer)
        low_scale = guidance_scale if guidance_scale_2 is None else guidance_scale_2
        low = WanVelocity(self.low_noise, prompt, negative, guidance_scale=low_scale, **condition)
        return _one_at_a_time(BoundaryVelocity(high, low, self.boundary), self.transformer, self.low_noise)

    def i2v(self, image: np.ndarray, frames: int) -> dict[str, torch.Tensor | None]:
        """The image-to-video conditioning of a window of ``frames`` frames on ``image`` (uint8 ``(H, W, 3)``)."""
        with model_lock(self.vae):
            condition = i2v_condition(self.vae, to_model_range(image[None]), frames)
        states = None
        if self.image_encoder is not None:
            with model_lock(self.image_encoder):  # its offloading hooks move shared weights
                states = image_states(self.image_encoder, self.processor, image)
        return {"condition": condition, "image": states}


def _one_at_a_time(velocity: Any, *transformers: Any) -> Any:
    """``velocity`` taking the transformers' locks while it runs where they are offloaded: the offloading hooks move
    the shared model's weights between devices, so two stages (an ``each:`` sweep) must not run it at once."""
    offloaded = [model_lock(t) for t in transformers if is_offloaded(t)]
    if not offloaded:
        return velocity

    def locked(x: torch.Tensor, sigma: float, timestep: float) -> torch.Tensor:
        with contextlib.ExitStack() as held:
            for lock in offloaded:
                held.enter_context(lock)
            return velocity(x, sigma, timestep)

    return locked


def _wan(ctx: StageContext) -> _Wan:
    transformer = ctx.model("transformer")
    wan = _Wan(transformer, ctx.model("vae"), ctx.model("transformer", "scheduler"))
    if transformer.config.get("image_dim"):
        wan.image_encoder = ctx.model("transformer", "image_encoder")
        wan.processor = ctx.model("transformer", "image_processor")
    _two_experts(ctx, wan)
    return wan


def _two_experts(ctx: StageContext, wan: _Wan) -> None:
    """Wan 2.2 A14B's low-noise expert and the timestep it takes over at, from the bundle's ``model_index.json``
    (``transformer_2`` and ``boundary_ratio``); nothing for a bundle of one transformer."""
    index = ctx.model_config("transformer", "", "model_index.json") or {}
    ratio, second = index.get("boundary_ratio"), index.get("transformer_2")
    if ratio is not None and second and second[0] is not None:
        wan.low_noise = ctx.model("transformer", "transformer_2")
        wan.boundary = float(ratio) * wan.scheduler.config.num_train_timesteps


def _prompts(ctx: StageContext) -> torch.Tensor:
    return torch.from_numpy(ctx.array("content", "prompt_embeds", "float32"))


def _five(latents: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Stored latents ``(f, C, h, w)`` as the transformer's ``(1, C, f, h, w)``."""
    return torch.as_tensor(np.asarray(latents, np.float32)).transpose(0, 1).unsqueeze(0)


def _four(latents: torch.Tensor) -> torch.Tensor:
    """The transformer's ``(1, C, f, h, w)`` as stored ``(f, C, h, w)``."""
    return latents[0].transpose(0, 1)


def _sample(wan: _Wan, velocity: Any, x: torch.Tensor, schedule: FlowSchedule, strength: float, solver: str,
            on_step: Callable[[int, float, torch.Tensor], None]) -> torch.Tensor:  # fmt: skip
    """Generate from ``x`` at the start of an edit of ``strength`` down to 0 by ``solver``."""
    if solver == "scheduler":
        return generate_scheduled(velocity, x, wan.scheduler, schedule.num_steps, strength=strength, on_step=on_step)
    return generate(velocity, x, schedule, strength=strength, solver=solver, on_step=on_step)


def _same_frames(encoded: int, **inputs: int) -> None:
    """Refuses inputs that stand for another number of frames than the latents."""
    other = {name: count for name, count in inputs.items() if count != encoded}
    if other:
        found = ", ".join(f"{name} {count}" for name, count in other.items())
        raise ArtifactMismatch(f"the latents stand for {encoded} frames but the inputs hold {found}; wire every input "
                               "to the same decode_video")  # fmt: skip


def _label(i: int, sigma: float) -> str:
    return f"step {i + 1} · σ={float(sigma):.3g}"


def _check_kind(ctx: PreflightContext, needs: str) -> None:
    """Refuses, before any model loads, a transformer that is not the kind the method needs, naming the fix."""
    check_vae(ctx)
    config = ctx.model_config("transformer")
    if config is None:
        return
    index = ctx.model_config("transformer", "", "model_index.json") or {}
    if getattr(ctx.spec.params, "guidance_scale_2", None) is not None and not (index.get("transformer_2") or [None])[0]:
        raise ValueError("guidance_scale_2 guides Wan 2.2 A14B's low-noise expert, but this bundle has one transformer; "
                         "leave it out")  # fmt: skip
    kind = checkpoint_kind(config.get("_class_name", ""), config)
    if kind != needs:
        fixes = {"i2v": "an image-to-video bundle such as Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
                 "vace": "a VACE bundle such as Wan-AI/Wan2.1-VACE-1.3B-diffusers"}  # fmt: skip
        raise ValueError(f"method {ctx.spec.method} needs {ARTICLE[needs]} {needs.upper()} transformer, but this model's "
                         f"is {kind.upper()} ({config.get('_class_name')}); use {fixes[needs]}")  # fmt: skip
    scheduler = ctx.model_config("transformer", "scheduler", "scheduler_config.json")
    if scheduler is not None:
        import diffusers

        name = scheduler.get("_class_name", "")
        cls = getattr(diffusers, name, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ValueError(f"the transformer's scheduler config names {name!r}, which is no diffusers scheduler; use the "
                             "checkpoint's own scheduler/scheduler_config.json")  # fmt: skip
        FlowSchedule.from_scheduler(cls.from_config(scheduler), 2)  # refuses one that is not flow matching, naming the fix


# invert_latents (flowmatch) ------------------------------------------------------------------


@stage_task("invert_latents", "flowmatch")
def invert_latents(call: StageCall) -> ArtifactRef:
    """Every step of every window's inversion ``steps (W, S+1, f, 16, h, w)``, the normalisation statistics and,
    when checked, each latent frame's reconstruction error. Resumable by step."""
    return run_stage(call, _invert, resumable=True)


def _invert(ctx: StageContext) -> FlowInversion:
    p: FlowInvertParams = ctx.call.stage.params
    latents, attrs, frames = ctx.input("latents")["latents"], ctx.attrs("latents"), ctx.input("frames")["frames"]
    _, windows = windows_of(attrs.windows, attrs.frames)
    _same_frames(attrs.frames, frames=frames.shape[0])
    wan, prompts = _wan(ctx), _prompts(ctx)
    schedule = FlowSchedule.from_scheduler(wan.scheduler, p.num_steps)
    store = InversionStore.create(ctx, len(windows), schedule.steps(p.strength), latents.shape[1], latents.shape[2:],
                                  p.normalisation, p.check_reconstruction, "latent_frame", to_model=_five, from_model=_four)  # fmt: skip
    calls = store.count * (2 if p.check_reconstruction else 1)
    ctx.progress.start(len(windows) * calls)
    ctx.steps.start(store.count, "flow-matching inversion (first window computed)")
    for window in windows:
        if ctx.writer.is_done(f"window-{window.index}"):
            ctx.progress.advance(calls)
            continue
        x0, mean, std = normalise_latents(torch.from_numpy(np.asarray(latents[window.index], np.float32)), p.normalisation)
        store.begin(window.index, x0, mean, std)
        source = window_video(frames, window, attrs.windows.length)[0]  # the window's own first frame
        velocity = wan.velocity(prompts, p.guidance_scale, **wan.i2v(source, attrs.windows.length))
        x = invert(velocity, _five(x0), schedule, strength=p.strength, solver=p.solver, extrapolate=p.extrapolate,
                   resume=store.resume(ctx, window.index), on_step=store.stream(ctx, window.index))  # fmt: skip
        if p.check_reconstruction:
            back = generate(velocity, x, schedule, strength=p.strength, solver=p.solver, on_step=lambda *_: ctx.progress.advance())
            store.errors[window.index] = (_four(back) - x0).pow(2).mean(dim=(1, 2, 3)).sqrt().numpy()
        ctx.writer.mark_done(f"window-{window.index}")
    levels = range(schedule.num_steps, schedule.start_index(p.strength) - 1, -1)  # sigma index of each level
    if store.errors is not None:
        _publish_errors(ctx, np.asarray(store.errors[:]))
    return FlowInversion(
        num_steps=p.num_steps, strength=p.strength, scheduler=type(wan.scheduler).__name__,
        sigmas=[schedule.sigmas[k] for k in levels], timesteps=[schedule.timestep(k) for k in levels], solver=p.solver,
        extrapolate=p.extrapolate, normalisation=p.normalisation, guidance_scale=p.guidance_scale, frames=attrs.frames,
        windows=attrs.windows,
    )  # fmt: skip


def _publish_errors(ctx: StageContext, errors: np.ndarray) -> None:
    chart = ctx.picture("reconstruction-error", bar_chart(errors.reshape(-1)))
    ctx.publish(f"**reconstruction error** per latent frame, window after window: RMS latent error of each latent frame "
                f"generated back from its inversion with the source conditioning (mean {errors.mean():.4f}, largest "
                f"{errors.max():.4f}).\n\n{chart}")  # fmt: skip
    ctx.record(reconstruction={"mean": float(errors.mean()), "max": float(errors.max())})


@stage_check("invert_latents", "flowmatch")
def _check_invert(ctx: PreflightContext) -> None:
    _check_kind(ctx, "i2v")


# denoise_latents (wan-propagate) -------------------------------------------------------------


@stage_task("denoise_latents", "wan-propagate")
def propagate(call: StageCall) -> ArtifactRef:
    """Edited frames ``frames (F, H, W, 3)``, each window's latents, the frame each window was conditioned on, each
    window's colour map and each frame's colour statistics. Resumable by window."""
    return run_stage(call, _propagate, resumable=True)


def _schedule_of(wan: _Wan, attrs: FlowInversion) -> FlowSchedule:
    """The schedule an edit descends: this model's, which must be the one the inversion climbed."""
    schedule = FlowSchedule.from_scheduler(wan.scheduler, attrs.num_steps)
    start = schedule.start_index(attrs.strength)
    if not np.allclose(schedule.sigmas[start:][::-1], attrs.sigmas, rtol=1e-6):
        raise ArtifactMismatch(f"the inversion climbed the sigmas {attrs.sigmas}, but this model's scheduler descends "
                               f"{list(schedule.sigmas[start:])}; invert with the same model")  # fmt: skip
    return schedule


def _propagate(ctx: StageContext) -> None:
    p: WanPropagateParams = ctx.call.stage.params
    attrs: FlowInversion = ctx.attrs("inversion")
    steps, stats = ctx.input("inversion")["steps"], ctx.input("inversion")
    plan, windows = windows_of(attrs.windows, attrs.frames)
    wan, prompts = _wan(ctx), _prompts(ctx)
    schedule = _schedule_of(wan, attrs)
    with ctx.open_source("image") as handle:
        edited, _ = resize_like(read_image("image", handle), ctx.attrs("frames"))
    out = PropagationStore.create(ctx, windows, edited.shape, steps.shape[2:], LATENT_DIMS)

    @functools.cache
    def edited_latents() -> torch.Tensor:
        """The edited frame's own latents ``(16, h, w)`` (first_frame rescales every window to them)."""
        with model_lock(wan.vae):
            return i2v_condition(wan.vae, to_model_range(edited[None]), 1)[0, 4:, 0]

    def compute(window: Window, previous: np.ndarray | None = None) -> np.ndarray:
        image = edited if previous is None else previous[0]
        condition = wan.i2v(image, attrs.windows.length)
        first = condition["condition"][0, 4:, 0]  # (16, h, w): the conditioning frame's own latents
        velocity = wan.velocity(prompts, p.guidance_scale, p.guidance_scale_2, **condition)
        ctx.steps.start(schedule.steps(attrs.strength), "flow-matching generation (first window)")
        x = _sample(wan, velocity, _five(steps[window.index, -1]), schedule, attrs.strength, p.solver,
                    lambda i, sigma, x: ctx.steps.keep(i, _four(x), _label(i, sigma), part=window.index))  # fmt: skip
        x = _four(x)
        if p.rescale or p.window_colour == "first_frame":
            x = rescale_latents(x, edited_latents() if p.window_colour == "first_frame" else first)
        elif attrs.normalisation != "none":  # back to the VAE's scale: the inversion's own statistics
            x = x * torch.from_numpy(np.asarray(stats["norm_std"][window.index])) + torch.from_numpy(
                np.asarray(stats["norm_mean"][window.index]))
        frames = decode_window(wan.vae, x, window.stop - window.start, p.tiling)
        return out.keep(window, frames, previous, p.window_colour, x.numpy(), image)

    run_windows(ctx, plan, out.frames, compute, chain=len(windows) > 1)
    out.publish(ctx, windows, p.window_colour)
    ctx.record(start_sigma=schedule.sigmas[schedule.start_index(attrs.strength)])
    return None


@stage_check("denoise_latents", "wan-propagate")
def _check_propagate(ctx: PreflightContext) -> None:
    _check_kind(ctx, "i2v")


# denoise_latents (vace) ----------------------------------------------------------------------


@stage_task("denoise_latents", "vace")
def vace(call: StageCall) -> ArtifactRef:
    """Edited frames ``frames (F, H, W, 3)``, the structure video VACE read ``structure (F, H, W)`` (the depth at
    level t_s, in [0, 1]) and each window's latents. Resumable by window."""
    return run_stage(call, _vace, resumable=True)


def _vace(ctx: StageContext) -> None:
    p: VaceParams = ctx.call.stage.params
    attrs: WanLatents = ctx.attrs("latents")
    latents, source = ctx.input("latents")["latents"], ctx.input("frames")["frames"]
    plan, windows = windows_of(attrs.windows, attrs.frames)
    height, width = source.shape[1:3]
    depth = ctx.input("depth")["depth"]
    _same_frames(attrs.frames, frames=source.shape[0], depth=depth.shape[0])
    structure = _write_structure(ctx, depth, p.t_s, (height, width))
    mask = _mask(ctx)
    reference = _reference(ctx, (height, width))
    wan = _Wan(ctx.model("transformer"), ctx.model("vae"), ctx.model("transformer", "scheduler"))
    _two_experts(ctx, wan)
    prompts = _prompts(ctx)
    schedule = FlowSchedule.from_scheduler(wan.scheduler, p.num_steps)
    start = schedule.start_index(p.strength)
    out_latents = ctx.writer.create_array(
        "window_latents", shape=(len(windows), *latents.shape[1:]), dtype=np.float32, dims=("window", *LATENT_DIMS),
        chunks=(1, *latents.shape[1:]))  # fmt: skip
    out = ctx.writer.create_array("frames", shape=(attrs.frames, height, width, 3), dtype=np.uint8,
                                  dims=("frame", "y", "x", "rgb"))  # fmt: skip

    def compute(window: Window, previous: np.ndarray | None = None) -> np.ndarray:
        length = attrs.windows.length
        video, generate_mask = _control_video(window_video(structure, window, length), window_video(source, window, length), mask)
        if previous is not None:  # the frames shared with the previous window are given: its output there
            video[:, :, : window.head] = to_model_range(previous).transpose(0, 1)[None]
            generate_mask[:, :, : window.head] = 0.0
        with model_lock(wan.vae):
            control = vace_control(wan.vae, video, generate_mask, reference)
        x0 = _five(latents[window.index])
        if reference is not None:  # the reference's latent frame leads, as VACE's pipeline puts it
            x0 = torch.cat([control[:, :16, :1], x0], dim=2)
        noise = torch.randn(x0.shape, generator=seeded_generator(ctx.call.seed, "start", window.index))
        sigma = schedule.sigmas[start]
        velocity = wan.velocity(prompts, p.guidance_scale, p.guidance_scale_2, control=control,
                                control_scale=p.conditioning_scale)  # fmt: skip
        ctx.steps.start(schedule.steps(p.strength), "VACE generation (first window)")
        x = _sample(wan, velocity, (1 - sigma) * x0 + sigma * noise, schedule, p.strength, p.solver,
                    lambda i, s, x: ctx.steps.keep(i, _four(x), _label(i, s), part=window.index))  # fmt: skip
        x = _four(x)[1:] if reference is not None else _four(x)
        out_latents[window.index] = x.numpy()
        return decode_window(wan.vae, x, window.stop - window.start, p.tiling)

    run_windows(ctx, plan, out, compute, chain=len(windows) > 1)
    ctx.record(start_sigma=schedule.sigmas[start], reference=reference is not None, mask=mask is not None)
    return None


def _write_structure(ctx: StageContext, depth: Any, t_s: int, size: tuple[int, int]) -> zarr.Array:
    """The clip's depth at structure level ``t_s`` on the frames' grid, ``structure (F, H, W)`` in [0, 1], written a
    chunk at a time; VACE reads exactly these frames (as a grey video in [-1, 1])."""
    count = depth.shape[0]
    out = ctx.writer.create_array("structure", shape=(count, *size), dtype=np.float32, dims=("frame", "y", "x"),
                                  chunks=(min(count, 16), *size))  # fmt: skip
    for start in range(0, count, 16):
        chunk = torch.from_numpy(np.asarray(depth[start : start + 16], np.float32))
        if tuple(chunk.shape[-2:]) != size:
            chunk = F.interpolate(chunk[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        out[start : start + len(chunk)] = structure_level(chunk, t_s).clamp(0.0, 1.0).numpy()
    shown = spread(count, 6)
    frames = np.asarray(ctx.input("frames")["frames"].oindex[shown])
    sheet = contact_sheet(frames, [np.asarray(out.oindex[shown])], labels=[f"#{i}" for i in shown],
                          key=f"depth at structure level {t_s} as VACE reads it, [0, 1]")  # fmt: skip
    ctx.publish(f"**structure** the depth VACE follows, at structure level {t_s}, under the frames it came from\n\n"
                f"{ctx.picture(f'structure-t{t_s}', sheet)}")  # fmt: skip
    return out


def _control_video(structure: np.ndarray, source: np.ndarray, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """VACE's video ``(1, 3, F, H, W)`` in [-1, 1] and its mask ``(1, 1, F, H, W)`` (1: generate) for one window: the
    structure where it generates, the source frames where a mask keeps them."""
    grey = torch.from_numpy(structure * 2.0 - 1.0)[None, None].expand(1, 3, -1, -1, -1)
    generate_mask = torch.ones(1, 1, *structure.shape)
    if mask is None:
        return grey.clone(), generate_mask
    keep = mask < 0.5
    video = torch.where(keep, to_model_range(source).transpose(0, 1)[None], grey)
    return video, torch.where(keep, 0.0, generate_mask)


def _mask(ctx: StageContext) -> torch.Tensor | None:
    """The optional mask (white: edit) on the frames' grid, ``(1, 1, 1, H, W)``, resized like the video's frames (drawn
    on a source frame, it stays on what it covers when the frames were cropped or padded)."""
    if "mask" not in ctx.call.sources:
        return None
    with ctx.open_source("mask") as handle:
        mask = read_image("mask", handle, mask=True)
    grey = np.repeat(np.round(mask * 255).astype(np.uint8)[..., None], 3, axis=-1)
    resized, _ = resize_like(grey, ctx.attrs("frames"))
    return torch.from_numpy(resized[..., 0].astype(np.float32) / 255.0)[None, None, None]


def _reference(ctx: StageContext, size: tuple[int, int]) -> torch.Tensor | None:
    """The optional reference image ``(1, 3, H, W)`` in [-1, 1], scaled to fit the frames and centred on white, as
    VACE's pipeline places it."""
    if "reference" not in ctx.call.sources:
        return None
    with ctx.open_source("reference") as handle:
        image = to_model_range(read_image("reference", handle)[None])
    scale = min(size[0] / image.shape[-2], size[1] / image.shape[-1])
    height, width = int(image.shape[-2] * scale), int(image.shape[-1] * scale)
    resized = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
    canvas = torch.ones(1, 3, *size)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    canvas[:, :, top : top + height, left : left + width] = resized
    return canvas


@stage_check("denoise_latents", "vace")
def _check_vace(ctx: PreflightContext) -> None:
    """Refuses, before any model loads, a transformer that is not VACE's, a VAE that is not Wan's, and a mask source
    that is not one image."""
    _check_kind(ctx, "vace")
    if ctx.has_source("mask") and ctx.source("mask").num_frames != 1:
        raise ValueError(f"VACE takes one mask image for every frame; this mask source holds "
                         f"{ctx.source('mask').num_frames} masks (a folder or a video): give one PNG")  # fmt: skip
