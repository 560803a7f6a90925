"""What resuming saves: an inversion killed at 80% of its steps, then run again.

FateZero's inversion on the tiny bundle (CPU) is interrupted after step 0.8 T (the attempt raises
from its step callback, leaving the partial artifact as a killed process would), then rerun. Printed
side by side: the steps the rerun computed, its time, and an uninterrupted inversion's time. Without
resume the rerun would compute all T steps again.

Run: ``.venv/bin/python benchmarks/resume_saving.py [--steps 20 --frames 4 --size 64]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.attention_store import make_spec, planned_stages, run  # noqa: E402


class Killed(Exception):
    pass


def interrupted(stages: dict, at_step: int) -> None:
    """Run the inversion until ``at_step`` steps are stored, then fail it."""
    import reelflow.tasks.fatezero as fz

    real = fz.fatezero_invert

    def invert_until(*args, on_step, **kwargs):
        def step(k, t, z):
            on_step(k, t, z)
            if k + 1 == at_step:
                raise Killed(f"killed after step {k}")

        return real(*args, on_step=step, **kwargs)

    fz.fatezero_invert = invert_until
    try:
        run(stages["invert_latents"])
    except Killed:
        pass
    finally:
        fz.fatezero_invert = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--at", type=float, default=0.8, help="fraction of the steps done when the run is killed")
    args = parser.parse_args()

    from reelflow.core.synthetic import write_synthetic_clip
    from reelflow.core.tiny import build_tiny_bundle
    from reelflow.storage.store import ArtifactStore

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="reelflow-resume-bench-"))
    build_tiny_bundle(work / "tiny-sd")
    write_synthetic_clip(work / "clip.mp4", width=args.size * 3 // 2, height=args.size, seconds=args.frames / 24 + 0.5)
    kill_at = int(args.at * args.steps)

    timings = {}
    for store in ("clean", "resumed"):
        stages = planned_stages(make_spec(work, args.frames, args.size, args.steps, 1, store=store), work)
        run(stages["decode_video"]), run(stages["encode_latents"])
        if store == "resumed":
            interrupted(stages, kill_at)
        timings[store] = run(stages["invert_latents"])
        group = ArtifactStore(str(work / store)).open("invert_latents", stages["invert_latents"].key)
        if store == "resumed":
            resumed_from = group.attrs["attention_store"]["resumed_from_step"]

    recomputed = args.steps - resumed_from
    print(f"FateZero inversion, {args.steps} steps, {args.frames} frames at {args.size}px, tiny UNet, CPU; killed after {kill_at} of {args.steps} steps")
    print(f"  steps recomputed after the kill: {recomputed} of {args.steps} ({recomputed / args.steps:.0%}); "
          f"without resume: {args.steps} (100%)")  # fmt: skip
    print(f"  rerun {timings['resumed']:.2f} s vs uninterrupted {timings['clean']:.2f} s: "
          f"{timings['resumed'] / timings['clean']:.2f}x")  # fmt: skip
    print(json.dumps({"steps": args.steps, "killed_after": kill_at, "recomputed": recomputed, **timings}))


if __name__ == "__main__":
    main()
