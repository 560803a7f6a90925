"""Peak memory of a Wan edit as clips grow: flat, because every stage holds one window at a time.

The videoshop-wan pipeline (Wan VAE encode, UMT5 prompt, flow-matching inversion, first-frame propagation with
its decode) runs on the tiny Wan image-to-video bundle on clips of 1x, 4x and 16x the model's frame count
(``--window`` frames, 4k+1), and, for contrast, on the 16x clip as one window (the whole clip through the
VAE and the transformer at once). Each case runs in a fresh process (a process's peak never goes down) and
reports its peak RSS above the same process's peak after imports and planning (the model and the clips are
made beforehand, outside it), with the ratio to the 1x
case. Stages run as the flow runs them, through their task functions, without a Prefect server.

Measured here (2 cores, 256x256, windows of 9): 1x 480 MiB, 4x 532 MiB (1.11x), 16x 341 MiB (0.71x): flat, within the
allocator's noise. The one-window contrast stays flat too at this scale (457 MiB, 0.95x): Wan's VAE is causal and
works four frames at a time with a cache, and the tiny transformer's activations are small beside the VAE's at
full resolution, so what windows save shows at real sizes (81 frames at 480x832 are 32,760 tokens a window for the
transformer; a 16x clip in one window would be 16 times that), not in this tiny run.

Run: ``.venv/bin/python benchmarks/wan_memory.py [--window 9 --size 256 --steps 4]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASE = """
import json, resource, sys
from pathlib import Path
import fsspec
from reelflow.deployments import spec_path
from reelflow.flows.dag import plan_run
from reelflow.schemas.calls import SourceRef, StoreSpec
from reelflow.schemas.loading import load_spec
from reelflow.storage.keys import content_key
from reelflow.tasks import task_for

work, frames, size, window, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
model, clip, edit = work / "tiny-wan-i2v", work / f"clip-{frames}.mp4", work / f"clip-{frames}.edit.png"
spec = load_spec(spec_path("videoshop-wan"), [
    f"models.wan.id={model}", f"models.wan_vae.id={model}", "models.wan.dtype=float32", f"sources.edited_frame.path={edit}",
    f"stages.decode_video.params.num_frames={frames}", f"stages.decode_video.params.width={size}",
    f"stages.decode_video.params.height={size}", f"stages.encode_latents.params.window={window}",
    f"stages.invert_latents.params.num_steps={steps}"])
fs = fsspec.filesystem("file")
sources = {"video": SourceRef(url=str(clip), key=content_key(fs, str(clip))),
           "edited_frame": SourceRef(url=str(edit), key=content_key(fs, str(edit)), kind="image")}
stages = {p.id: p for p in plan_run(spec, sources=sources, store=StoreSpec(url=str(work / f"store-{frames}-{window}")),
                                    run_id="bench", default_dtype="float32")}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for sid in ("decode_video", "encode_latents", "embed_content", "invert_latents", "denoise_latents"):
    task_for(stages[sid].call.stage).fn(call=stages[sid].call)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))
"""


def prepare(work: Path, frames: int, size: int) -> None:
    """The tiny model and the case's clip with its edited frame, made here so no case's peak includes making them."""
    from reelflow.core.synthetic import write_edited_first_frame, write_synthetic_clip
    from reelflow.core.tiny_wan import build_tiny_wan_i2v

    if not (work / "tiny-wan-i2v").is_dir():
        build_tiny_wan_i2v(work / "tiny-wan-i2v")
    clip = work / f"clip-{frames}.mp4"
    if not clip.is_file():
        write_synthetic_clip(clip, width=size, height=size, fps=24, seconds=frames / 24)
        write_edited_first_frame(clip, work / f"clip-{frames}.edit.png")


def peak(work: Path, frames: int, size: int, window: int | None, steps: int) -> float:
    out = subprocess.run([sys.executable, "-c", CASE, str(work), str(frames), str(size), json.dumps(window), str(steps)],
                         check=True, capture_output=True, text=True, cwd=REPO)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=9, help="the model's frame count here (4k+1)")
    parser.add_argument("--size", type=int, default=256, help="frame width and height (a multiple of 16)")
    parser.add_argument("--steps", type=int, default=4, help="steps of the schedule (0.6 of them inverted)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        cases = [(m, m * args.window, args.window) for m in (1, 4, 16)] + [(16, 16 * args.window, None)]
        print(f"videoshop-wan on the tiny Wan I2V bundle, {args.size}x{args.size}, windows of {args.window} frames, "
              f"{args.steps} steps; peak RSS above the process's own after setup, each case in a fresh process")  # fmt: skip
        base = None
        for multiple, frames, window in cases:
            prepare(work, frames, args.size)
            mib = peak(work, frames, args.size, window, args.steps)
            base = base or mib
            how = f"windows of {window}" if window else "one window"
            print(f"{multiple:>3}x  {frames:>4} frames  {how:<14} peak {mib:8.1f} MiB   x{mib / base:5.2f} of 1x")


if __name__ == "__main__":
    main()
