"""Orchestration overhead and cached-rerun speed of the reconstruct preset.

Measured side by side in one process, on the same clip and the same (already loaded) tiny model:

0. an empty Prefect flow run (the fixed cost every run pays);
1. the core calls of the preset in a plain Python loop (decode, resize, VAE encode, VAE decode,
   MP4 encode, PSNR/SSIM), data held in memory;
2. the ``edit-video`` flow, cold (a fresh store each repeat): Prefect tasks, the Zarr store,
   provenance, leases, the manifest;
3. the same flow rerun on the same store: every stage cached.

Prints medians and the two ratios. Run: ``.venv/bin/python benchmarks/orchestration_overhead.py``.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def plain_loop(clip: Path, bundle: Path, frames: int, size: int) -> None:
    from reelflow.core.frames import from_model_range, plan_resize, resize_frames, to_model_range
    from reelflow.core.metrics import psnr, ssim
    from reelflow.core.models import load_component
    from reelflow.core.vae import decode_latents, encode_frames
    from reelflow.core.video import FrameSelection, decode_audio, decode_frames, encode_mp4, probe_video, select_frames

    info = probe_video(clip)
    span = select_frames(info, FrameSelection(num_frames=frames))
    pixels = decode_frames(clip, span.indices)
    audio = decode_audio(clip, span.start, span.end)
    plan = plan_resize(info.width, info.height, width=size, height=size, fit="crop", multiple=8)
    source = resize_frames(pixels, plan)
    vae = load_component(str(bundle), "vae")
    latents = encode_frames(vae, to_model_range(source), chunk_size=8)
    edited = from_model_range(decode_latents(vae, latents.to(torch.float16).float(), chunk_size=8))
    encode_mp4(io.BytesIO(), edited, span.fps, audio, crf=18, preset="medium")
    psnr(source, edited), ssim(source, edited)


def make_spec(clip: Path, bundle: Path, store: Path, out: Path, frames: int, size: int):
    from reelflow.deployments import spec_path
    from reelflow.schemas.loading import load_spec

    return load_spec(
        spec_path("reconstruct"),
        [
            f"input={clip}", f"store={store}", f"output={out}", f"models.sd.id={bundle}",
            f"stages.decode_video.params.num_frames={frames}",
            f"stages.decode_video.params.width={size}", f"stages.decode_video.params.height={size}",
            "stages.decode_video.params.multiple=8",
        ],
    )  # fmt: skip


def empty_flow() -> None:
    """Prefect's fixed cost of one flow run against the same server: create, run nothing, finish."""
    from prefect import flow

    flow(name="empty")(lambda: None)()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from reelflow.core.synthetic import write_synthetic_clip
    from reelflow.core.tiny import build_tiny_bundle
    from reelflow.flows.edit import edit_video

    work = Path(tempfile.mkdtemp(prefix="reelflow-bench-"))
    clip, bundle = work / "clip.mp4", build_tiny_bundle(work / "tiny-sd")
    write_synthetic_clip(clip, width=args.size * 3 // 2, height=args.size, fps=24, seconds=args.frames / 24 + 0.5)
    torch.manual_seed(0)

    with prefect_test_harness(server_startup_timeout=120):
        plain_loop(clip, bundle, args.frames, args.size)  # warm-up: model cache, codecs, kernels
        edit_video(make_spec(clip, bundle, work / "warm", work / "warm-out", args.frames, args.size))
        empty_flow()
        plain, cold, cached, empty = [], [], [], []
        for i in range(args.repeats):
            empty.append(timed(empty_flow))
            spec = make_spec(clip, bundle, work / f"store-{i}", work / f"out-{i}", args.frames, args.size)
            plain.append(timed(lambda: plain_loop(clip, bundle, args.frames, args.size)))
            cold.append(timed(lambda: edit_video(spec)))
            cached.append(timed(lambda: edit_video(spec)))

    p, c, r, e = (statistics.median(x) for x in (plain, cold, cached, empty))
    print(f"reconstruct preset, {args.frames} frames at {args.size}x{args.size}, tiny VAE, CPU, median of {args.repeats}")
    print(f"  plain loop of the core calls      {p:8.3f} s   {np.round(plain, 3).tolist()}")
    print(f"  edit-video flow, cold             {c:8.3f} s   {np.round(cold, 3).tolist()}")
    print(f"  edit-video flow, cached rerun     {r:8.3f} s   {np.round(cached, 3).tolist()}")
    print(f"  an empty Prefect flow run         {e:8.3f} s   {np.round(empty, 3).tolist()}")
    print(f"  orchestration overhead (cold flow / plain loop): {c / p:.2f}x  (+{c - p:.2f} s per edit,")
    print(f"    of which {e:.2f} s is Prefect's fixed cost per flow run and {c - p - e:.2f} s stages, store and manifest)")
    print(f"  cached rerun / cold run:                         {r / c:.3f}")


if __name__ == "__main__":
    main()
