"""Move video frames into and out of the VAE latent space, a chunk of frames at a time.

Latent diffusion runs in the latent space of a pretrained autoencoder, scaled so that the latents
have roughly unit variance (Rombach et al. 2022, §3); ``vae.config.scaling_factor`` is
that scale and, for later VAEs, ``shift_factor`` the offset removed first. Every latent this project
stores or feeds to a UNet is already scaled: ``z = (E(x) - shift) * scale``.

Frames are processed in chunks so that peak memory is bounded by ``chunk_size`` however long the
clip, and each chunk is handed to ``on_chunk`` as soon as it is ready, so a caller can stream it to
storage and report progress. An image VAE (``AutoencoderKL``) treats frames independently, so the
chunking changes no value. Stable Video Diffusion's ``AutoencoderKLTemporalDecoder`` encodes frame by
frame too, but its decoder mixes neighbouring frames (temporal convolutions and blends), so a decoded
chunk is one clip of ``chunk length`` frames and the chunk size changes the decoded values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder

OnChunk = Callable[[int, int, torch.Tensor], None]
"""``on_chunk(start, stop, chunk)``: frames ``start:stop`` are done and ``chunk`` holds them."""

VideoVAE = AutoencoderKL | AutoencoderKLTemporalDecoder


def encode_frames(
    vae: VideoVAE,
    frames: torch.Tensor,
    *,
    chunk_size: int,
    sample: bool = False,
    generator: torch.Generator | None = None,
    on_chunk: OnChunk | None = None,
) -> torch.Tensor:
    """Encode frames to scaled latents.

    Args:
        vae: An ``AutoencoderKL`` or ``AutoencoderKLTemporalDecoder`` (whose encoder is per
            frame); inputs are cast to its dtype and device.
        frames: ``(F, 3, H, W)`` in ``[-1, 1]``; ``H`` and ``W`` multiples of the VAE's
            downscale (8).
        chunk_size: Frames per VAE call.
        sample: Draw from the posterior instead of taking its mode. The mode is deterministic,
            which inversion needs; sampling matches how the model was trained.
        generator: Seeds the draw when ``sample`` is true.
        on_chunk: Called with ``(start, stop, latents[start:stop])`` after each chunk.

    Returns:
        Latents ``(F, 4, H/8, W/8)``, float32 on the CPU, scaled as the UNet expects.
    """
    _check_batch(frames, channels=3, chunk_size=chunk_size, name="frames")
    factor = downscale_factor(vae)
    if frames.shape[-2] % factor or frames.shape[-1] % factor:
        # The encoder floors odd sizes, and the decoded frames would no longer match the input.
        size = tuple(frames.shape[-2:])
        raise ValueError(f"frame height and width must be multiples of {factor}; got {size}")
    scale, shift = latent_scale(vae)

    def encode(chunk: torch.Tensor) -> torch.Tensor:
        posterior = vae.encode(chunk.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        return (latents - shift) * scale

    return _chunked(encode, frames, chunk_size, on_chunk)


def decode_latents(
    vae: VideoVAE,
    latents: torch.Tensor,
    *,
    chunk_size: int,
    on_chunk: OnChunk | None = None,
) -> torch.Tensor:
    """Decode scaled latents to frames; the inverse of :func:`encode_frames` up to the VAE's loss.

    A temporal decoder (``AutoencoderKLTemporalDecoder``) decodes each chunk as one clip, with
    ``num_frames`` the chunk's length, as ``StableVideoDiffusionPipeline.decode_latents`` does with
    ``decode_chunk_size``. Frames in one chunk then see each other, so for a temporal decoder the
    chunk size changes the decoded values (and a chunk of 1 decodes every frame alone); for an image
    VAE it changes none.

    Args:
        vae: An ``AutoencoderKL`` or ``AutoencoderKLTemporalDecoder``; latents are cast to its dtype
            and device.
        latents: ``(F, 4, h, w)``, scaled as :func:`encode_frames` returns them.
        chunk_size: Frames per VAE call; for a temporal decoder, also frames per decoded clip.
        on_chunk: Called with ``(start, stop, frames[start:stop])`` after each chunk.

    Returns:
        Frames ``(F, 3, 8h, 8w)``, float32 on the CPU, clamped to ``[-1, 1]``.
    """
    channels = vae.config.latent_channels
    _check_batch(latents, channels=channels, chunk_size=chunk_size, name="latents")
    scale, shift = latent_scale(vae)
    temporal = isinstance(vae, AutoencoderKLTemporalDecoder)

    def decode(chunk: torch.Tensor) -> torch.Tensor:
        z = chunk.to(device=vae.device, dtype=vae.dtype) / scale + shift
        clip = {"num_frames": chunk.shape[0]} if temporal else {}
        return vae.decode(z, **clip).sample.clamp(-1.0, 1.0)

    return _chunked(decode, latents, chunk_size, on_chunk)


def downscale_factor(vae: VideoVAE) -> int:
    """Pixels per latent along each side: one halving per encoder block after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_scale(vae: VideoVAE) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)``: latents are stored as ``(z - shift) * scale``."""
    shift = getattr(vae.config, "shift_factor", None)
    return float(vae.config.scaling_factor), float(shift) if shift is not None else 0.0


def _chunked(
    fn: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    chunk_size: int,
    on_chunk: OnChunk | None,
) -> torch.Tensor:
    """Apply ``fn`` to ``batch`` ``chunk_size`` frames at a time; float32 CPU results, in order."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, batch.shape[0], chunk_size):
            stop = min(start + chunk_size, batch.shape[0])
            chunk = fn(batch[start:stop]).float().cpu()
            if on_chunk is not None:
                on_chunk(start, stop, chunk)
            chunks.append(chunk)
    # Concatenated outside inference mode, so the result is an ordinary tensor that autograd
    # accepts (null-text optimisation differentiates through UNet calls on these latents).
    return torch.cat(chunks)


def _check_batch(batch: torch.Tensor, *, channels: int, chunk_size: int, name: str) -> None:
    if batch.ndim != 4 or batch.shape[1] != channels or batch.shape[0] == 0:
        shape = tuple(batch.shape)
        raise ValueError(f"{name} must have shape (F>0, {channels}, H, W); got {shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1; got {chunk_size}")
