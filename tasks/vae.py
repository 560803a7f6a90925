"""encode_latents and decode_latents: the VAE stages, chunked over frames and streamed to the store."""

from __future__ import annotations

import numpy as np
import torch

from reelflow.core.frames import from_model_range, to_model_range
from reelflow.core.vae import decode_latents as vae_decode
from reelflow.core.vae import downscale_factor
from reelflow.core.vae import encode_frames as vae_encode
from reelflow.schemas.calls import StageCall
from reelflow.schemas.kinds import Latents
from reelflow.schemas.refs import ArtifactRef
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task


@stage_task("encode_latents")
def encode_latents(call: StageCall) -> ArtifactRef:
    """VAE latents ``(F, 4, H/8, W/8)`` (float16, scaled by the VAE's scaling factor)."""
    return run_stage(call, _encode)


def _encode(ctx: StageContext) -> Latents:
    p = ctx.call.stage.params
    frames = to_model_range(ctx.array("frames", "frames"))
    vae = ctx.model("vae")
    count, _, height, width = frames.shape
    scale = downscale_factor(vae)
    shape = (count, vae.config.latent_channels, height // scale, width // scale)
    dims = ("frame", "latent_channel", "y", "x")
    latents = ctx.writer.create_array("latents", shape=shape, dtype=np.float16, dims=dims)
    generator = torch.Generator().manual_seed(ctx.call.seed) if p.sample else None
    ctx.progress.start(count, unit="frames")

    def store_chunk(start: int, stop: int, chunk: torch.Tensor) -> None:
        latents[start:stop] = chunk.numpy().astype(np.float16)
        ctx.progress.advance(stop - start)

    vae_encode(vae, frames, chunk_size=p.chunk_size, sample=p.sample, generator=generator, on_chunk=store_chunk)
    ctx.record(scaling_factor=float(vae.config.scaling_factor), downscale=scale)
    return Latents()


@stage_task("decode_latents")
def decode_latents(call: StageCall) -> ArtifactRef:
    """RGB frames uint8 ``(F, H, W, 3)`` decoded from latents by the VAE."""
    return run_stage(call, _decode)


def _decode(ctx: StageContext) -> None:
    p = ctx.call.stage.params
    latents = torch.from_numpy(ctx.array("latents", "latents", "float32"))
    vae = ctx.model("vae")
    count, _, height, width = latents.shape
    scale = downscale_factor(vae)
    shape = (count, height * scale, width * scale, 3)
    frames = ctx.writer.create_array("frames", shape=shape, dtype=np.uint8, dims=("frame", "y", "x", "rgb"))
    ctx.progress.start(count, unit="frames")

    def store_chunk(start: int, stop: int, chunk: torch.Tensor) -> None:
        frames[start:stop] = from_model_range(chunk)
        ctx.progress.advance(stop - start)

    vae_decode(vae, latents, chunk_size=p.chunk_size, on_chunk=store_chunk)
    return None
