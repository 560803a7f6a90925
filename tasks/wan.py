"""encode_latents and decode_latents (Wan): the causal 3D VAE over the whole clip, frames in, frames back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from reelflow.core.frames import from_model_range, to_model_range
from reelflow.core.wan import SPATIAL, check_size, denormalise, normalise, plan_frames
from reelflow.schemas.calls import StageCall
from reelflow.schemas.refs import ArtifactRef
from reelflow.schemas.wan import WanDecodeParams, WanEncodeParams, WanLatents
from reelflow.tasks.models import model_lock
from reelflow.tasks.preflight import PreflightContext, stage_check
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

LATENT_DIMS = ("latent_frame", "latent_channel", "y", "x")
VAE_CLASS = "AutoencoderKLWan"


@stage_task("encode_latents", "wan")
def encode_latents(call: StageCall) -> ArtifactRef:
    """Normalised Wan latents ``(latent_frame, 16, H/8, W/8)`` float32 of the clip, padded or trimmed to 4k+1 frames."""
    return run_stage(call, _encode)


def _encode(ctx: StageContext) -> WanLatents:
    p: WanEncodeParams = ctx.call.stage.params
    frames = ctx.input("frames")["frames"]
    plan = plan_frames(frames.shape[0], p.frame_policy)
    check_size(frames.shape[1], frames.shape[2])
    video = np.asarray(frames[: plan.used])
    if plan.padded:
        video = np.concatenate([video, np.repeat(video[-1:], plan.padded, axis=0)])
    vae = ctx.model("vae")
    ctx.progress.start(plan.frames, unit="frames")
    clip = to_model_range(video).permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, F, H, W)
    generator = torch.Generator().manual_seed(ctx.call.seed) if p.sample else None
    with _tiled(vae, p.tiling), torch.no_grad():
        dist = vae.encode(clip.to(vae.device, vae.dtype)).latent_dist
        latents = (dist.sample(generator) if p.sample else dist.mode()).float().cpu()
    ctx.progress.advance(plan.frames)
    latents = normalise(latents, vae.config)[0].transpose(0, 1)  # (f, 16, h, w)
    ctx.writer.write_array("latents", latents.numpy(), dims=LATENT_DIMS, dtype=np.float32)
    ctx.record(latents_mean=list(vae.config.latents_mean), latents_std=list(vae.config.latents_std))
    return WanLatents(frames=plan.used, padded=plan.padded, frame_policy=p.frame_policy, latent_frames=latents.shape[0])


@stage_task("decode_latents", "wan")
def decode_latents(call: StageCall) -> ArtifactRef:
    """RGB frames uint8 ``(F, H, W, 3)`` decoded from Wan latents, the encoded frames only (padding dropped)."""
    return run_stage(call, _decode)


def _decode(ctx: StageContext) -> None:
    p: WanDecodeParams = ctx.call.stage.params
    attrs: WanLatents = ctx.attrs("latents")
    latents = torch.from_numpy(ctx.array("latents", "latents", "float32"))  # (f, 16, h, w)
    vae = ctx.model("vae")
    ctx.progress.start(attrs.frames, unit="frames")
    z = denormalise(latents.transpose(0, 1).unsqueeze(0), vae.config)
    with _tiled(vae, p.tiling), torch.no_grad():
        video = vae.decode(z.to(vae.device, vae.dtype)).sample.float().cpu()  # (1, 3, F, H, W)
    frames = from_model_range(video[0].transpose(0, 1)[: attrs.frames])
    ctx.writer.write_array("frames", frames, dims=("frame", "y", "x", "rgb"))
    ctx.progress.advance(attrs.frames)
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
        plan = plan_frames(frames.count, p.frame_policy, what=f"{ctx.stage_id}'s clip")
        if plan.padded:
            ctx.logger.info("%s: %d frames padded to %d (4k+1) for Wan's VAE, the copies dropped when decoding", ctx.stage_id,
                            frames.count, plan.frames)  # fmt: skip
    _check_vae(ctx)


@stage_check("decode_latents", "wan")
def _check_vae(ctx: PreflightContext) -> None:
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
