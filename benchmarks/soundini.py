"""Soundini's sampler, measured on tiny random SD parts (or the tiny guided-diffusion ADM, pixel space, with
``--backbone adm``): the cost of one guided step (UNet and, on SD, VAE decoder forward and backward, CLIP on
augmented views, flow, background and range losses) against one unguided DDIM step, and the peak memory of a
whole edit at 1x, 4x and 16x the clip length, each in a fresh process (a process's peak never goes down),
chunked so it should stay flat.

Run: ``.venv/bin/python benchmarks/soundini.py [--frames 4 --side 64 --chunk 4 --backbone sd|adm]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def _backbone(name: str):  # noqa: ANN202
    """``(unet, vae, scheduler, embeds, channels, downscale)``: tiny SD in latents, or the tiny ADM in pixels."""
    if name == "sd":
        from reelflow.core.tiny import tiny_pipeline

        pipe = tiny_pipeline(0)
        return SimpleNamespace(unet=pipe.unet, vae=pipe.vae, scheduler=pipe.scheduler, embeds=torch.zeros(1, 77, 32),
                               channels=4, downscale=8)  # fmt: skip
    from reelflow.core.models.base import ModelSource
    from reelflow.core.models.guided_diffusion_family import GuidedDiffusionFamily
    from reelflow.core.tiny_adm import build_tiny_adm

    family = GuidedDiffusionFamily()
    with tempfile.TemporaryDirectory() as folder:
        source = ModelSource("tiny", path=build_tiny_adm(Path(folder) / "adm"))
        return SimpleNamespace(unet=family.load(source), vae=None, scheduler=family.load(source, component="scheduler"),
                               embeds=None, channels=3, downscale=1)  # fmt: skip


def _parts(frames: int, side: int, backbone: str, seed: int = 0):  # noqa: ANN202
    from reelflow.core.editing.soundini import Region
    from reelflow.core.tiny import tiny_clip_vision

    pipe, clip = _backbone(backbone), tiny_clip_vision()
    generator = torch.Generator().manual_seed(seed)
    grid, channels = side // pipe.downscale, pipe.channels
    source = torch.randn(frames, channels, grid, grid, generator=generator)
    mask = torch.zeros(frames, 1, grid, grid)
    mask[..., grid // 4 : 3 * grid // 4, grid // 4 : 3 * grid // 4] = 1.0
    noise = torch.randn(1, channels, grid, grid, generator=generator).expand(frames, -1, -1, -1)
    return pipe, clip, Region(mask, source, noise), torch.randn(frames, 16, generator=generator)


def _losses(clip, target, frames: int, side: int):  # noqa: ANN001, ANN202
    import torch.nn.functional as F

    from reelflow.core.guidance.sound import flow_loss, range_loss, sound_loss

    zero = torch.zeros(frames - 1, 2, side, side)

    def losses(pixels: torch.Tensor, seen: slice, anchored: bool, step: int) -> torch.Tensor:
        views = F.interpolate(torch.cat([pixels, pixels.flip(-1)]), size=(32, 32), mode="bilinear", align_corners=False)
        loss = 1000 * sound_loss(clip(pixel_values=views).image_embeds, target[seen].repeat(2, 1)).sum()
        loss = loss + 50 * range_loss(pixels).sum()
        if len(pixels) > 1:
            pairs = zero[: len(pixels) - 1]
            loss = loss + 5000 * flow_loss(pixels, pairs, pairs, torch.ones_like(pixels[:, :1])).sum()
        return loss

    return losses


def step_costs(frames: int, side: int, chunk: int, repeats: int, backbone: str) -> tuple[float, float]:
    from reelflow.core.editing.gen1 import edit_timesteps
    from reelflow.core.editing.soundini import predict_noise, soundini_denoise
    from reelflow.core.sampling.ddim import ddim_denoise_step

    pipe, clip, region, target = _parts(frames, side, backbone)
    timesteps = edit_timesteps(pipe.scheduler, 10, 1.0)[:1]
    z = region.noised(slice(None), float(pipe.scheduler.alphas_cumprod[timesteps[0]]))
    embeds = pipe.embeds
    guided = unguided = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        soundini_denoise(pipe.unet, pipe.vae, z, embeds, pipe.scheduler, 10, timesteps, region,
                         _losses(clip, target, frames, side), chunk=chunk)  # fmt: skip
        guided = min(guided, time.perf_counter() - started)
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, frames, chunk):
                part = z[start : start + chunk]
                eps = predict_noise(pipe.unet, part, int(timesteps[0]), embeds)
                ddim_denoise_step(eps, timesteps[0], part, pipe.scheduler, 10)
        unguided = min(unguided, time.perf_counter() - started)
    return guided, unguided


def peak_mib(frames: int, side: int, chunk: int, backbone: str) -> float:
    """Peak resident memory of a two-step edit of ``frames`` frames, in a fresh process."""
    code = (f"import benchmarks.soundini as b, resource, json; b.one_edit({frames}, {side}, {chunk}, {backbone!r}); "
            "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) / 1024.0


def one_edit(frames: int, side: int, chunk: int, backbone: str = "sd") -> None:
    from reelflow.core.editing.gen1 import edit_timesteps
    from reelflow.core.editing.soundini import soundini_denoise

    pipe, clip, region, target = _parts(frames, side, backbone)
    timesteps = edit_timesteps(pipe.scheduler, 10, 0.2)
    z = region.noised(slice(None), float(pipe.scheduler.alphas_cumprod[timesteps[0]]))
    soundini_denoise(pipe.unet, pipe.vae, z, pipe.embeds, pipe.scheduler, 10, timesteps, region,
                     _losses(clip, target, frames, side), chunk=chunk)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4, help="the 1x clip length")
    parser.add_argument("--side", type=int, default=64, help="frame side in pixels")
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backbone", choices=("sd", "adm"), default="sd", help="SD latents or guided-diffusion pixels")
    args = parser.parse_args()
    guided, unguided = step_costs(args.frames, args.side, args.chunk, args.repeats, args.backbone)
    print(f"{args.backbone}: {args.frames} frames of {args.side}x{args.side}, chunks of {args.chunk} (best of {args.repeats})")
    print(f"  unguided DDIM step:  {1000 * unguided:8.1f} ms")
    print(f"  guided step:         {1000 * guided:8.1f} ms")
    print(f"  guided / unguided:   {guided / unguided:8.1f}x")
    peaks = {scale: peak_mib(scale * args.frames, args.side, args.chunk, args.backbone) for scale in (1, 4, 16)}
    for scale, mib in peaks.items():
        print(f"  peak memory, {scale:>2}x length ({scale * args.frames:>3} frames): {mib:8.0f} MiB ({mib / peaks[1]:.2f}x of 1x)")


if __name__ == "__main__":
    main()
