"""encode_latents and decode_latents (Wan): the causal 3D VAE window by window, frames in, frames back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from reelflow.core.frames import from_model_range, to_model_range
from reelflow.core.wan import SPATIAL, FramePlan, check_size, denormalise, normalise, plan_frames
from reelflow.core.windows import Window, WindowPlan
from reelflow.schemas.calls import StageCall
from reelflow.schemas.errors import ArtifactMismatch
from reelflow.schemas.kinds import WindowInfo
from reelflow.schemas.refs import ArtifactRef
from reelflow.schemas.wan import WanDecodeParams, WanEncodeParams, WanLatents
from reelflow.tasks.models import model_lock
from reelflow.tasks.preflight import PreflightContext, stage_check
from reelflow.tasks.propagation import plan_full_windows, seeded_generator
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task
from reelflow.tasks.windows import run_windows

LATENT_DIMS = ("latent_frame", "latent_channel", "y", "x")
VAE_CLASS = "AutoencoderKLWan"
MODEL_FRAMES = 81  # the frame count Wan 2.1/2.2 and VACE are trained on


def plan_wan_windows(count: int, window: int | None, overlap: int, policy: str, *, what: str = "the clip") -> tuple[WindowPlan, list[Window], FramePlan]:  # fmt: skip
    """The windows a clip of ``count`` frames is encoded in: full windows of ``window`` frames sharing ``overlap``
    (the last moved back to end at the clip's end), or, for a clip no longer than one window (or no ``window``),
    one window of the clip padded to ``4k + 1`` frames by ``policy``."""
    if window is None or count <= window:
        frames = plan_frames(count, policy, what=what)
        plan = WindowPlan(frames.frames)
        return plan, plan.windows(frames.used), frames
    plan, windows = plan_full_windows(window, overlap, count)
    return plan, windows, FramePlan(count, count, 0)


def windows_of(info: WindowInfo, frames: int) -> tuple[WindowPlan, list[Window]]:
    """The plan and windows a stored :class:`WindowInfo` of ``frames`` source frames was cut by.

    Raises:
        ArtifactMismatch: Cutting the clip again gives other windows (an older stage version wrote them).
    """
    plan = WindowPlan(info.length) if len(info.spans) == 1 else WindowPlan(info.length, info.overlap, last="full")
    windows = plan.windows(frames)
    if [(w.start, w.stop) for w in windows] != [tuple(span) for span in info.spans]:
        raise ArtifactMismatch(f"the stored windows {info.spans} are not the ones {frames} frames are cut into; an older "
                               "version of the stage wrote them: remove the artifact and rerun")  # fmt: skip
    return plan, windows


def window_video(frames: Any, window: Window, length: int) -> np.ndarray:
    """The window's source frames uint8 ``(length, H, W, 3)``, the last repeated up to ``length`` (4k+1)."""
    video = np.asarray(frames[window.start : window.stop])
    return np.concatenate([video, np.repeat(video[-1:], length - len(video), axis=0)]) if len(video) < length else video


def decode_window(vae: Any, latents: torch.Tensor, keep: int, tiling: bool) -> np.ndarray:
    """The first ``keep`` frames uint8 ``(keep, H, W, 3)`` decoded from one window's normalised latents ``(f, 16, h, w)``."""
    z = denormalise(latents.transpose(0, 1).unsqueeze(0), vae.config)
    with _tiled(vae, tiling), torch.no_grad():
        video = vae.decode(z.to(vae.device, vae.dtype)).sample.float().cpu()  # (1, 3, F, H, W)
    return from_model_range(video[0].transpose(0, 1)[:keep])


@stage_task("encode_latents", "wan")
def encode_latents(call: StageCall) -> ArtifactRef:
    """Normalised Wan latents ``(window, latent_frame, 16, H/8, W/8)`` float32 of the clip. Resumable by window."""
    return run_stage(call, _encode, resumable=True)


def _encode(ctx: StageContext) -> WanLatents:
    p: WanEncodeParams = ctx.call.stage.params
    frames = ctx.input("frames")["frames"]
    count, height, width = frames.shape[:3]
    check_size(height, width)
    plan, windows, counted = plan_wan_windows(count, p.window, p.overlap, p.frame_policy)
    vae = ctx.model("vae")
    latent_frames = (plan.length - 1) // 4 + 1
    shape = (latent_frames, vae.config.z_dim, height // SPATIAL, width // SPATIAL)
    out = ctx.writer.create_array("latents", shape=(len(windows), *shape), dtype=np.float32, dims=("window", *LATENT_DIMS),
                                  chunks=(1, *shape))  # fmt: skip
    ctx.progress.start(len(windows), unit="windows")
    for window in windows:
        if ctx.writer.is_done(f"window-{window.index}"):
            ctx.progress.advance()
            continue
        clip = to_model_range(window_video(frames, window, plan.length)).permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, F, H, W)
        with _tiled(vae, p.tiling), torch.no_grad():
            dist = vae.encode(clip.to(vae.device, vae.dtype)).latent_dist
            latents = dist.sample(seeded_generator(ctx.call.seed, "posterior", window.index)) if p.sample else dist.mode()
        out[window.index] = normalise(latents.float().cpu(), vae.config)[0].transpose(0, 1).numpy()  # (f, 16, h, w)
        ctx.writer.mark_done(f"window-{window.index}")
        ctx.progress.advance()
    ctx.record(latents_mean=list(vae.config.latents_mean), latents_std=list(vae.config.latents_std))
    info = WindowInfo(length=plan.length, overlap=plan.overlap, spans=[(w.start, w.stop) for w in windows])
    return WanLatents(frames=counted.used, padded=counted.padded, frame_policy=p.frame_policy, latent_frames=latent_frames,
                      windows=info)  # fmt: skip


@stage_task("decode_latents", "wan")
def decode_latents(call: StageCall) -> ArtifactRef:
    """RGB frames uint8 ``(F, H, W, 3)`` decoded from Wan latents, the encoded frames only (padding dropped), windows
    cross-faded where they share frames. Resumable by window."""
    return run_stage(call, _decode, resumable=True)


def _decode(ctx: StageContext) -> None:
    p: WanDecodeParams = ctx.call.stage.params
    attrs: WanLatents = ctx.attrs("latents")
    latents = ctx.input("latents")["latents"]
    plan, _ = windows_of(attrs.windows, attrs.frames)
    vae = ctx.model("vae")
    height, width = latents.shape[-2] * SPATIAL, latents.shape[-1] * SPATIAL
    out = ctx.writer.create_array("frames", shape=(attrs.frames, height, width, 3), dtype=np.uint8,
                                  dims=("frame", "y", "x", "rgb"))  # fmt: skip

    def decode(window: Window) -> np.ndarray:
        return decode_window(vae, torch.from_numpy(np.asarray(latents[window.index], np.float32)), window.stop - window.start, p.tiling)

    run_windows(ctx, plan, out, decode)
    return None


@contextmanager
def _tiled(vae: Any, tiling: bool) -> Iterator[None]:
    """The shared VAE with spatial tiling on or off for one stage, as it was after."""
    with model_lock(vae):
        before = getattr(vae, "use_tiling", False)
        vae.use_tiling = tiling
        try:
            yield
        finally:
            vae.use_tiling = before


@stage_check("encode_latents", "wan")
def _check_encode(ctx: PreflightContext) -> None:
    """Refuses, before any model loads, frames the VAE cannot tile, a frame count the policy refuses, and a VAE that
    is not Wan's."""
    p: WanEncodeParams = ctx.spec.params
    frames = ctx.input("frames")
    if frames is not None:
        check_size(frames.height, frames.width, what=f"{ctx.stage_id}'s frames")
        _, windows, plan = plan_wan_windows(frames.count, p.window, p.overlap, p.frame_policy, what=f"{ctx.stage_id}'s clip")
        if plan.padded:
            ctx.logger.info("%s: %d frames padded to %d (4k+1) for Wan's VAE, the copies dropped when decoding", ctx.stage_id,
                            frames.count, plan.frames)  # fmt: skip
        if len(windows) > 1:
            ctx.logger.info("%s: %d frames in %d windows of %d", ctx.stage_id, frames.count, len(windows), p.window)
        if p.window is None and plan.frames > MODEL_FRAMES:
            ctx.logger.warning("%s: the clip's %d frames are one window; Wan's transformers are trained on %d frames "
                               "and an edit holds a whole window at once: set params.window to %d for edits",
                               ctx.stage_id, plan.frames, MODEL_FRAMES, MODEL_FRAMES)  # fmt: skip
    check_vae(ctx)


@stage_check("decode_latents", "wan")
def check_vae(ctx: PreflightContext) -> None:
    """Refuses a VAE that is not Wan 2.1's 3D VAE (16 channels, 8x in space), naming the fix."""
    config = ctx.model_config("vae") or {}
    found = config.get("_class_name")
    if found is not None and found != VAE_CLASS:
        raise ValueError(f"{ctx.stage_id}: the vae role needs Wan's {VAE_CLASS} (a Wan-AI/...-Diffusers bundle's vae/); "
                         f"this model's vae is a {found}")  # fmt: skip
    shape = (config.get("z_dim", 16), config.get("scale_factor_spatial") or SPATIAL, config.get("patch_size"))
    if found is not None and shape != (16, SPATIAL, None):
        raise ValueError(f"{ctx.stage_id}: this {VAE_CLASS} has {shape[0]} channels, {shape[1]}x in space and patch size "
                         f"{shape[2]} (Wan 2.2 TI2V-5B's); these stages take the 16-channel, 8x VAE of Wan 2.1 and Wan 2.2 "
                         "A14B: use one of those bundles")  # fmt: skip
