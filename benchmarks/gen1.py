"""Gen-1's temporal guidance, measured: the cost of a step with three predictions (per-frame without
and with content, cross-frame with content) against plain per-frame classifier-free guidance (two),
side by side in one process, on a tiny random SD UNet and ControlNet; and what an IP-Adapter's image
tokens add to a temporal-guidance step.

Run: ``.venv/bin/python benchmarks/gen1.py [--frames 8 --latent 32 --steps 6]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from diffusers import ControlNetModel

    from reelflow.core.attention.ip_adapter import ip_adapter
    from reelflow.core.attention.processor import install_frame_processors
    from reelflow.core.models.ip_adapter_family import read_adapter
    from reelflow.core.tiny_gen1 import IP_ADAPTER_WEIGHTS, build_tiny_ip_adapter
    from reelflow.core.editing.gen1 import Structure, edit_timesteps, gen1_denoise
    from reelflow.core.tiny import sd15_scheduler, tiny_unet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    unet = tiny_unet().eval()
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).eval()
    install_frame_processors(unet, frame_keys=("self", "first"), cross_attention=False)
    z = torch.randn(args.frames, 4, args.latent, args.latent)
    depth = torch.rand(args.frames, 8 * args.latent, 8 * args.latent)
    embeds = torch.randn(2, 77, 32)
    scheduler = sd15_scheduler()
    timesteps = edit_timesteps(scheduler, args.steps, 1.0)

    with tempfile.TemporaryDirectory() as folder:
        adapter = read_adapter(build_tiny_ip_adapter(Path(folder) / "ip-adapter") / IP_ADAPTER_WEIGHTS)
    image_embeds = torch.cat([torch.zeros(1, 1, 32), torch.randn(1, 1, 32)])

    def seconds_per_step(omega_t: float, images: torch.Tensor | None = None) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            gen1_denoise(unet, z, embeds, Structure(depth, controlnet), scheduler, args.steps, timesteps, omega=7.5,
                         omega_t=omega_t, image_embeds=images)  # fmt: skip
            best = min(best, (time.perf_counter() - started) / len(timesteps))
        return best

    plain, temporal = seconds_per_step(0.0), seconds_per_step(1.0)
    with ip_adapter(unet, adapter):
        adapted = seconds_per_step(1.0, image_embeds)
    print(f"{args.frames} frames, {args.latent}x{args.latent} latents, ControlNet, {args.steps} steps (best of {args.repeats})")
    print(f"  per-frame CFG (2 predictions):        {1000 * plain:8.1f} ms per step")
    print(f"  temporal guidance (3 predictions):    {1000 * temporal:8.1f} ms per step")
    print(f"  temporal / plain:                     {temporal / plain:8.2f}x")
    print(f"  temporal with an IP-Adapter:          {1000 * adapted:8.1f} ms per step")
    print(f"  IP-Adapter / without:                 {adapted / temporal:8.2f}x")


if __name__ == "__main__":
    main()
