"""embed_content (image), invert_latents and denoise_latents (Videoshop): an edited first frame
propagated through a clip of any length with Stable Video Diffusion, one window of the model's frame
count at a time.

The inversion stores every step of every window (``steps``, level 0 the normalised latents) and
resumes from the last stored step; the edit stores every window as a part, conditions each window
on the previous one's output at the frame they share, and resumes at the first missing window.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from diffusers import EulerDiscreteScheduler

from reelflow.core.editing.videoshop import (
    ImageCondition,
    SvdDenoiser,
    added_time_ids,
    condition_on_image,
    guidance_ramp,
    inversion_latents,
    normalise_latents,
    rescale_latents,
)
from reelflow.core.frames import from_model_range
from reelflow.core.inversion.edm import EdmSchedule, generate, inverse_init_sigma, invert
from reelflow.core.sources import read_image
from reelflow.core.vae import decode_latents
from reelflow.core.windows import Window, WindowPlan
from reelflow.schemas.calls import StageCall
from reelflow.schemas.errors import ArtifactMismatch
from reelflow.schemas.kinds import Resize
from reelflow.schemas.refs import ArtifactRef
from reelflow.schemas.videoshop import EdmInversion, ImageContent, VideoshopInvertParams, VideoshopParams, WindowInfo
from reelflow.tasks.artifacts import bar_chart, contact_sheet
from reelflow.tasks.frames import frame_labels
from reelflow.tasks.preflight import PreflightContext, stage_check
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task
from reelflow.tasks.propagation import InversionStore, PropagationStore, plan_full_windows, resize_like, seeded_generator
from reelflow.tasks.windows import run_windows

LATENT_DIMS = ("latent_channel", "y", "x")
logger = logging.getLogger(__name__)


# embed_content (image) -----------------------------------------------------------------------


@stage_task("embed_content", "image")
def embed_content(call: StageCall) -> ArtifactRef:
    """The image resized like the video ``image (H, W, 3)``, its CLIP embedding ``image_embeds (1, D)``, its
    noise-augmented VAE mode ``conditioning_latents (C, h, w)`` and its scaled clean latents ``latents``."""
    return run_stage(call, _embed)


def _embed(ctx: StageContext) -> ImageContent:
    p, video = ctx.call.stage.params, ctx.attrs("frames")
    with ctx.open_source("image") as handle:
        given = read_image("image", handle)
    image, plan = resize_like(given, video)
    condition = condition_on_image(
        image, image_encoder=ctx.model("image_encoder"), vae=ctx.model("vae"),
        processor=ctx.model("image_encoder", "feature_extractor"), noise_aug_strength=p.noise_aug_strength,
        generator=seeded_generator(ctx.call.seed, "edited-frame", 0),
    )  # fmt: skip
    ctx.writer.write_array("image", image, dims=("y", "x", "rgb"))
    ctx.writer.write_array("image_embeds", condition.embeds.numpy(), dims=("image", "embedding"))
    ctx.writer.write_array("conditioning_latents", condition.latents.numpy(), dims=LATENT_DIMS, dtype=np.float32)
    ctx.writer.write_array("latents", condition.clean.numpy(), dims=LATENT_DIMS, dtype=np.float32)
    source = np.asarray(ctx.input("frames")["frames"][0])
    label = frame_labels(ctx.store, ctx.input("frames"), [0])[0]
    picture = ctx.picture("first-frames", contact_sheet(np.stack([source, image]), labels=[f"source, {label}", "edited"]))
    ctx.publish(f"**the source's first frame** "
                     f"and the edited one\n\n{picture}")  # fmt: skip
    return ImageContent(image_size=(given.shape[1], given.shape[0]), size=(image.shape[1], image.shape[0]),
                        resize=Resize(scaled=(plan.scaled_w, plan.scaled_h), output=(plan.out_w, plan.out_h),
                                      fit=video.resize.fit),
                        embedding_dim=int(condition.embeds.shape[-1]), noise_aug_strength=p.noise_aug_strength)  # fmt: skip


@stage_check("embed_content", "image")
def _check_image(ctx: PreflightContext) -> None:
    """States in the log how an edited frame of another size or aspect than the video is resized."""
    image, frames = ctx.source("image"), ctx.input("frames")
    if frames is None or image.width is None or image.height is None:
        return None
    video = (frames.source_width, frames.source_height)
    if (image.width, image.height) != video:
        said = (f"{ctx.stage_id}: the image is {image.width}x{image.height} and the video {video[0]}x{video[1]}; it is "
                f"resized like the video's frames ({frames.fit} to {frames.width}x{frames.height})")  # fmt: skip
        if abs(math.log((image.width / image.height) / (video[0] / video[1]))) > 0.01:
            ctx.logger.warning("%s, but its aspect ratio differs, so the %s cuts it unlike the frames: edit a frame "
                               "exported at the video's own size", said, frames.fit)  # fmt: skip
        else:
            ctx.logger.info("%s", said)
    return None


# invert_latents (videoshop) ------------------------------------------------------------------


@stage_task("invert_latents", "videoshop")
def invert_latents(call: StageCall) -> ArtifactRef:
    """Every step of every window's inversion ``steps (W, S+1, L, C, h, w)``, the normalisation statistics and,
    when checked, each frame's reconstruction error ``reconstruction_error (W, L)``. Resumable by step."""
    return run_stage(call, _invert, resumable=True)


@dataclass
class _Svd:
    """The Stable Video Diffusion components one stage uses."""

    unet: Any
    vae: Any
    image_encoder: Any
    processor: Any
    scheduler: Any


def _svd(ctx: StageContext) -> _Svd:
    processor = ctx.model("image_encoder", "feature_extractor")
    scheduler = ctx.model("unet", "scheduler", cls="EulerDiscreteScheduler")
    return _Svd(ctx.model("unet"), ctx.model("vae"), ctx.model("image_encoder"), processor, scheduler)


def _invert(ctx: StageContext) -> EdmInversion:
    p: VideoshopInvertParams = ctx.call.stage.params
    latents, frames = ctx.input("latents")["latents"], ctx.input("frames")["frames"]
    svd = _svd(ctx)
    schedule = EdmSchedule.from_scheduler(svd.scheduler, p.num_steps)
    _refuse_schedule(schedule, svd.scheduler.config.timestep_spacing, p)
    plan, windows = plan_full_windows(_window_length(p, svd.unet.config), p.overlap, latents.shape[0])
    store = InversionStore.create(ctx, len(windows), schedule.steps(p.strength), plan.length, latents.shape[1:],
                                  p.normalisation, p.check_reconstruction, "window_frame")  # fmt: skip
    ctx.progress.start(len(windows) * store.count * (2 if p.check_reconstruction else 1))
    ctx.steps.start(store.count, "EDM inversion (first window computed)")
    for window in windows:
        if ctx.writer.is_done(f"window-{window.index}"):
            ctx.progress.advance(store.count * (2 if p.check_reconstruction else 1))
            continue
        _invert_window(ctx, svd, schedule, store, window, latents, frames)
        ctx.writer.mark_done(f"window-{window.index}")
    ctx.record(reconstruction=_publish_reconstruction(ctx, store, windows) if p.check_reconstruction else None)
    spans = [(w.start, w.stop) for w in windows]
    return EdmInversion(num_steps=p.num_steps, strength=p.strength, sigmas=schedule.visited(p.strength),
                        threshold=p.threshold, naive=p.naive, normalisation=p.normalisation, fps=p.fps,
                        motion_bucket_id=p.motion_bucket_id,
                        windows=WindowInfo(length=plan.length, overlap=plan.overlap, spans=spans))  # fmt: skip


def _invert_window(
    ctx: StageContext, svd: _Svd, schedule: EdmSchedule, store: InversionStore, window: Window, latents: zarr.Array,
    frames: zarr.Array,
) -> None:  # fmt: skip
    """Invert one window from its last stored step, conditioned on the window's source first frame."""
    p: VideoshopInvertParams = ctx.call.stage.params
    x0, mean, std = normalise_latents(torch.from_numpy(np.asarray(latents[window.start : window.stop], np.float32)),
                                      p.normalisation)  # fmt: skip
    noise = torch.randn(x0.shape, generator=seeded_generator(ctx.call.seed, "proxy", window.index))
    condition = condition_on_image(np.asarray(frames[window.start]), image_encoder=svd.image_encoder, vae=svd.vae,
                                   processor=svd.processor, noise_aug_strength=p.noise_aug_strength,
                                   generator=seeded_generator(ctx.call.seed, "source-frame", window.index))  # fmt: skip
    model = SvdDenoiser(svd.unet, condition, added_time_ids(p.fps, p.motion_bucket_id, p.noise_aug_strength),
                        concat=inversion_latents(condition.latents, svd.vae.config.scaling_factor))  # fmt: skip
    store.begin(window.index, x0, mean, std)
    x = invert(model, x0, schedule, strength=p.strength, noise=noise, threshold=p.threshold, naive=p.naive,
               resume=store.resume(ctx, window.index), on_step=store.stream(ctx, window.index))  # fmt: skip
    if p.check_reconstruction:
        back = generate(model, x, schedule, strength=p.strength, on_step=lambda *_: ctx.progress.advance())
        store.errors[window.index] = (back - x0).pow(2).mean(dim=(1, 2, 3)).sqrt().numpy()


def _publish_reconstruction(ctx: StageContext, store: InversionStore, windows: list[Window]) -> dict[str, Any]:
    """Each frame's reconstruction error (from the window that owns it first) as a picture; returns a summary."""
    per_window = np.asarray(store.errors[:])
    per_frame = np.zeros(windows[-1].stop, np.float32)
    for window in reversed(windows):
        per_frame[window.start : window.stop] = per_window[window.index, : window.stop - window.start]
    chart = ctx.picture("reconstruction-error", bar_chart(per_frame))
    ctx.publish((
        f"**reconstruction error** per frame\n\nRMS latent error of each frame regenerated "
        f"from its inversion with the source conditioning (mean {per_frame.mean():.4f}, largest "
        f"{per_frame.max():.4f} at frame {int(per_frame.argmax())}).\n\n{chart}"))  # fmt: skip
    return {"mean": float(per_frame.mean()), "max": float(per_frame.max()), "per_frame": per_frame.round(5).tolist()}


def _window_length(p: VideoshopInvertParams, unet_config: Any) -> int:
    length = p.window or _get(unet_config, "num_frames")
    if not length:
        raise ValueError("the UNet's config names no num_frames; set params.window to the frames it was trained on")
    return int(length)


def _get(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def _refuse_schedule(schedule: EdmSchedule, spacing: str | None, p: VideoshopInvertParams) -> None:
    """Refuses a schedule under which the reference's inverse pass starts from zeros, or that takes no step."""
    if inverse_init_sigma(schedule, spacing or "leading") == 0.0:
        raise ValueError(
            f"the scheduler config's timestep_spacing {spacing!r} gives the inverse pass an init_noise_sigma of 0, so "
            "the inversion would start from all-zero latents (the reference multiplies the clean latents by it); use "
            "timestep_spacing 'leading' (Stable Video Diffusion's published config) in scheduler/scheduler_config.json"
        )
    if schedule.steps(p.strength) == 0:
        raise ValueError(f"strength {p.strength} of {p.num_steps} steps inverts no step (int({p.num_steps} * "
                         f"{p.strength}) = 0); raise strength or num_steps")  # fmt: skip


@stage_check("invert_latents", "videoshop")
def _check_invert(ctx: PreflightContext) -> None:
    """Refuses, before any model loads, a scheduler that zeroes the start and a clip the windows do not fit."""
    p: VideoshopInvertParams = ctx.spec.params
    config = ctx.model_config("unet", "scheduler", "scheduler_config.json")
    if config is not None:
        schedule = EdmSchedule.from_scheduler(EulerDiscreteScheduler.from_config(config), p.num_steps)
        _refuse_schedule(schedule, config.get("timestep_spacing"), p)
    length, frames = p.window or (ctx.model_config("unet") or {}).get("num_frames"), ctx.input("frames")
    if length is not None and frames is not None:
        plan_full_windows(int(length), p.overlap, frames.count)


# denoise_latents (videoshop) -----------------------------------------------------------------


@stage_task("denoise_latents", "videoshop")
def denoise_latents(call: StageCall) -> ArtifactRef:
    """Edited frames ``frames (F, H, W, 3)``, each window's latents, the frame each window was conditioned on,
    each window's colour map and each frame's colour statistics. Resumable by window."""
    return run_stage(call, _denoise, resumable=True)


def _denoise(ctx: StageContext) -> None:
    p: VideoshopParams = ctx.call.stage.params
    inversion, attrs = ctx.input("inversion"), ctx.attrs("inversion")
    svd = _svd(ctx)
    plan, windows = _windows_of(ctx, attrs)
    schedule = EdmSchedule.from_scheduler(svd.scheduler, attrs.num_steps)
    if not np.allclose(schedule.visited(attrs.strength), attrs.sigmas, rtol=1e-6):
        raise ArtifactMismatch(f"the inversion climbed to the sigmas {attrs.sigmas}, but this model's scheduler visits "
                               f"{schedule.visited(attrs.strength)}; invert with the same model")  # fmt: skip
    edit = _WindowEdit(ctx, svd, schedule, attrs, _EditInputs.read(ctx), inversion["steps"])
    run_windows(ctx, plan, edit.out.frames, edit, chain=True)
    edit.out.publish(ctx, windows, p.window_colour)


@dataclass(frozen=True)
class _EditInputs:
    """The edited frame, resized like the video, and its conditioning (see embed_content)."""

    image: np.ndarray
    condition: ImageCondition
    noise_aug_strength: float

    @classmethod
    def read(cls, ctx: StageContext) -> _EditInputs:
        content = ctx.input("content")
        condition = ImageCondition(*(torch.from_numpy(np.asarray(content[name]))
                                     for name in ("image_embeds", "conditioning_latents", "latents")))  # fmt: skip
        return cls(np.asarray(content["image"]), condition, ctx.attrs("content").noise_aug_strength)


def _windows_of(ctx: StageContext, attrs: EdmInversion) -> tuple[WindowPlan, list[Window]]:
    plan, windows = plan_full_windows(attrs.windows.length, attrs.windows.overlap, attrs.windows.spans[-1][1])
    if [(w.start, w.stop) for w in windows] != [tuple(span) for span in attrs.windows.spans]:
        raise ArtifactMismatch(f"the inversion's windows {attrs.windows.spans} are not the ones {ctx.call.stage.tag} "
                               "cuts; an older version of its stage wrote it: remove it and rerun")  # fmt: skip
    return plan, windows


class _WindowEdit:
    """``compute(window, previous)`` of the windowed edit (see tasks.windows.run_windows), and its stores."""

    def __init__(self, ctx: StageContext, svd: _Svd, schedule: EdmSchedule, attrs: EdmInversion, edited: _EditInputs,
                 steps: zarr.Array) -> None:  # fmt: skip
        self.ctx, self.svd, self.schedule, self.attrs, self.edited, self.steps = ctx, svd, schedule, attrs, edited, steps
        self.p: VideoshopParams = ctx.call.stage.params
        self.out = PropagationStore.create(ctx, _windows_of(ctx, attrs)[1], edited.image.shape, steps.shape[2:],
                                          ("window_frame", *LATENT_DIMS))
        self.time_ids = added_time_ids(attrs.fps, attrs.motion_bucket_id, edited.noise_aug_strength)
        self.guidance = guidance_ramp(self.p.min_guidance_scale, self.p.max_guidance_scale, attrs.windows.length)

    def __call__(self, window: Window, previous: np.ndarray | None) -> np.ndarray:
        # 1. the conditioning: the edited frame, or the previous window's output at this window's first frame
        image, condition = self._condition(window, previous)
        # 2. generate from the window's inversion, 3. rescale to the reference latents
        start = torch.from_numpy(np.asarray(self.steps[window.index, -1]))
        model = SvdDenoiser(self.svd.unet, condition, self.time_ids, guidance=self.guidance)
        self.ctx.steps.start(self.schedule.steps(self.attrs.strength), "denoising (first window)")
        x = generate(model, start, self.schedule, strength=self.attrs.strength, on_step=lambda i, sigma, x: self.ctx.steps.keep(
            i, x, f"step {i + 1} · σ={float(sigma):.3g}", part=window.index))  # fmt: skip
        if self.p.rescale:
            x = rescale_latents(x, self.edited.condition.clean if self.p.window_colour == "first_frame" else condition.clean)
        # 4. decode with the temporal decoder, 5. match the colour of the frames shared with the previous window
        chunk = self.p.decode_chunk_size or self.attrs.windows.length
        frames = from_model_range(decode_latents(self.svd.vae, x, chunk_size=chunk))
        return self.out.keep(window, frames, previous, self.p.window_colour, x.numpy(), image)

    def _condition(self, window: Window, previous: np.ndarray | None) -> tuple[np.ndarray, ImageCondition]:
        if previous is None:
            return self.edited.image, self.edited.condition
        image = previous[0]
        return image, condition_on_image(image, image_encoder=self.svd.image_encoder, vae=self.svd.vae,
                                         processor=self.svd.processor, noise_aug_strength=self.edited.noise_aug_strength,
                                         generator=seeded_generator(self.ctx.call.seed, "edited-frame", window.index))  # fmt: skip
