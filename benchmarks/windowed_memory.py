"""Peak memory of a windowed stage as clips grow: flat, because one window is in memory at a time.

The toy method package's ``tint_frames`` (tests/plugins/reelflow-toy, installed into a temporary
folder as pip would) runs on clips of 1x, 4x and 16x the base length, windowed and, for contrast,
as one window holding the whole clip. Each case runs in a fresh process (a process's peak never goes
down) and reports its peak RSS above the same process's RSS after imports and setup.

Run: ``.venv/bin/python benchmarks/windowed_memory.py [--frames 32 --size 256 --window 8]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "tests" / "plugins" / "reelflow-toy"

CASE = """
import json, resource, sys
import numpy as np
from PIL import Image
import reelflow.tasks
from reelflow.schemas.calls import InputRef, SourceRef, StageCall, StoreSpec
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import task_for

work, frames, size, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = ArtifactStore(f"{work}/store-{frames}-{window}")
key = f"{frames:064x}"
with store.write("decode_video", key, {"provenance": {"key": key}}) as writer:  # the input, written a chunk at a time
    array = writer.create_array("frames", shape=(frames, size, size, 3), dtype="uint8", dims=("frame", "y", "x", "rgb"))
    for start in range(0, frames, 8):
        array[start:start + 8] = np.random.default_rng(start).integers(0, 255, (min(8, frames - start), size, size, 3), dtype=np.uint8)
    writer.update_attrs({"fps": "24/1", "start": 0.0, "end": frames / 24, "sample_rate": None,
                         "source_video": {"width": size, "height": size, "fps": "24/1", "num_frames": frames,
                                          "duration": frames / 24, "codec": "h264"},
                         "resize": {"scaled": [size, size], "output": [size, size], "fit": "crop"}})
Image.new("RGB", (8, 8), (200, 40, 40)).save(f"{work}/ref.png")
call = StageCall(pipeline="bench", key="f" * 64, run_id="bench", store=StoreSpec(url=store.url),
                 stage={"stage": "tint_frames", "params": {"window": window, "overlap": min(2, window // 2)}},
                 inputs={"frames": InputRef(stage="decode_video", key=key, kind="video_frames")},
                 sources={"reference": SourceRef(url=f"{work}/ref.png", key="r" * 64, kind="image")})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
task_for(call.stage).fn(call=call)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))
"""


def install_plugin(work: Path) -> Path:
    source, target = work / "toy-src", work / "toy-site"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(target), str(source)]  # fmt: skip
    subprocess.run(pip, check=True, capture_output=True)
    return target


def peak_mib(work: Path, site: Path, frames: int, size: int, window: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(site), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run([sys.executable, "-c", CASE, str(work), str(frames), str(size), str(window)],
                          env=env, capture_output=True, text=True, check=True)  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32, help="the 1x clip length")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--window", type=int, default=8)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="reelflow-window-bench-"))
    site = install_plugin(work)
    rows = {}
    for scale in (1, 4, 16):
        frames = args.frames * scale
        rows[scale] = {"frames": frames, "windowed": peak_mib(work, site, frames, args.size, args.window),
                       "whole": peak_mib(work, site, frames, args.size, frames)}  # fmt: skip
    clip_mib = {s: r["frames"] * args.size * args.size * 3 / 2**20 for s, r in rows.items()}
    print(f"tint_frames peak RSS above baseline, {args.size}x{args.size} frames, windows of {args.window} (CPU)")
    for scale, row in rows.items():
        print(f"  {scale:>2}x ({row['frames']:>4} frames, {clip_mib[scale]:6.1f} MiB of uint8): windowed "
              f"{row['windowed']:6.1f} MiB, one window {row['whole']:6.1f} MiB")  # fmt: skip
    print(f"  windowed 16x / 1x: {rows[16]['windowed'] / max(rows[1]['windowed'], 1e-3):.2f}x; "
          f"one window 16x / 1x: {rows[16]['whole'] / max(rows[1]['whole'], 1e-3):.2f}x")  # fmt: skip
    print(json.dumps(rows))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
