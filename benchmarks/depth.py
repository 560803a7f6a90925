"""estimate_depth, measured: frames per second with batching against one frame at a time, and the
flicker of the stored depth normalised per video against per frame.

1. Throughput: the estimate_depth stage (frames read from the store, preprocessing, the model, the
   bicubic resize back, both normalisation passes, the writes) on the tiny Depth Anything, 32
   synthetic frames at 256x256, with ``batch_size`` 8 against 1; best of a few runs, each into a
   fresh store, after one warm-up run (the model stays in the process's model cache).
2. Flicker: the mean absolute change of the stored depth from one frame to the next, with
   ``normalise: video`` against ``normalise: frame``, on the same synthetic clip.

The tiny model's weights are random: its depth follows the frames only faintly, so the flicker figures
say how the two normalisations treat a model's per-image drift, not how good a depth model is.

Run: ``.venv/bin/python benchmarks/depth.py [--frames 32 --size 256 --batch 8 --threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def plan(work: Path, store: str, frames: int, size: int, **params: object) -> dict:
    import fsspec

    from reelflow.flows.dag import plan_run
    from reelflow.schemas.calls import SourceRef, StoreSpec
    from reelflow.schemas.loading import load_spec
    from reelflow.storage.keys import content_key

    raw = {
        "name": "depth-benchmark",
        "models": {"depth": {"id": str(work / "depth-anything")}},
        "stages": [
            {"stage": "decode_video", "params": {"num_frames": frames, "width": size, "height": size, "multiple": 8}},
            {"stage": "estimate_depth", "params": params},
        ],
    }  # fmt: skip
    clip = str(work / "clip.mp4")
    source = SourceRef(url=clip, key=content_key(fsspec.filesystem("file"), clip))
    planned = plan_run(load_spec(raw), sources={"video": source}, store=StoreSpec(url=store), run_id="bench",
                       default_dtype="float32")  # fmt: skip
    return {p.id: p for p in planned}


def run(work: Path, store: str, frames: int, size: int, **params: object) -> tuple[float, object]:
    """Seconds of the depth stage (the frames decoded first, untimed), and its artifact."""
    from reelflow.storage.store import ArtifactStore
    from reelflow.tasks import task_for

    stages = plan(work, store, frames, size, **params)
    task_for(stages["decode_video"].call.stage).fn(call=stages["decode_video"].call)
    started = time.perf_counter()
    ref = task_for(stages["estimate_depth"].call.stage).fn(call=stages["estimate_depth"].call)
    return time.perf_counter() - started, ArtifactStore(store).open(ref.stage, ref.key)


def frames_per_second(work: Path, frames: int, size: int, batch: int, repeats: int) -> float:
    run(work, str(work / "warm-up"), frames, size, batch_size=batch)
    best = min(run(work, str(work / f"store-{batch}-{i}"), frames, size, batch_size=batch)[0] for i in range(repeats))
    return frames / best


def flicker(work: Path, frames: int, size: int, normalise: str) -> float:
    """Mean absolute frame-to-frame change of the stored depth (in [0, 1])."""
    _, group = run(work, str(work / f"store-{normalise}"), frames, size, normalise=normalise)
    depth = np.asarray(group["depth"][:], np.float32)
    return float(np.abs(np.diff(depth, axis=0)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the test suite uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from reelflow.core.synthetic import write_synthetic_clip
    from reelflow.core.tiny_depth import build_tiny_depth_anything

    with tempfile.TemporaryDirectory(prefix="reelflow-depth-bench-") as tmp:
        work = Path(tmp)
        write_synthetic_clip(work / "clip.mp4", width=args.size, height=args.size, fps=24,
                             seconds=args.frames / 24 + 0.5)  # fmt: skip
        build_tiny_depth_anything(work / "depth-anything")
        batched = frames_per_second(work, args.frames, args.size, args.batch, args.repeats)
        single = frames_per_second(work, args.frames, args.size, 1, args.repeats)
        print(f"throughput, tiny Depth Anything, {args.frames} frames at {args.size}x{args.size}, "
              f"{args.threads} thread(s):")  # fmt: skip
        print(f"  batch {args.batch}: {batched:8.1f} frames/s")
        print(f"  batch 1: {single:8.1f} frames/s")
        print(f"  ratio batched / one at a time: {batched / single:.2f}x")
        per_video, per_frame = (flicker(work, args.frames, args.size, mode) for mode in ("video", "frame"))
        print("flicker of the stored depth (mean |depth[t+1] - depth[t]|, depth in [0, 1]):")
        print(f"  normalised per video: {per_video:.4f}")
        print(f"  normalised per frame: {per_frame:.4f}")
        print(f"  ratio per frame / per video: {per_frame / per_video:.2f}x")


if __name__ == "__main__":
    main()
