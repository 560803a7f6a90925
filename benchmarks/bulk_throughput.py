"""Bulk throughput: clips per minute with 1, 2 and 4 concurrent edits, and the orchestration share.

One library of distinct synthetic clips, the reconstruct preset on the tiny bundle, the
``bulk-edit`` flow in this process (each clip a subflow) against one local Prefect server. Every
concurrency level gets a fresh store and output, so every stage is computed. Torch runs one
intra-op thread, so concurrent edits are what uses the cores.

Orchestration share: for each clip, its edit's wall time minus the time spent inside stage bodies
(the ``seconds`` each artifact records), summed over clips and divided by the summed wall time.
That is Prefect's flow and task runs, planning and hashing, the store's commits and leases, the
export and the manifest, and any waiting for a core.

Run: ``.venv/bin/python benchmarks/bulk_throughput.py [--clips 8] [--frames 12] [--size 96]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")


def stage_seconds(report) -> list[tuple[float, float]]:  # noqa: ANN001
    """(edit wall seconds, seconds inside stage bodies) per clip."""
    from reelflow.flows.bulk import read_manifest
    from reelflow.schemas.settings import Settings
    from reelflow.storage.store import ArtifactStore

    pairs = []
    for clip in report.clips:
        manifest = read_manifest(clip.manifest, Settings())
        store = ArtifactStore(manifest.store)
        inside = sum(
            store.read_attrs(store.artifact_path(r.stage, r.key)).get("seconds", 0.0)
            for r in manifest.stages
            if r.status == "computed"
        )
        pairs.append((clip.seconds, inside))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--levels", default="1,2,4")
    args = parser.parse_args()

    import torch
    from prefect.testing.utilities import prefect_test_harness

    from reelflow.core.synthetic import write_synthetic_clip
    from reelflow.core.tiny import build_tiny_bundle
    from reelflow.deployments import spec_path
    from reelflow.flows.bulk import bulk_edit
    from reelflow.schemas.loading import load_spec

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="reelflow-bulk-bench-"))
    bundle = build_tiny_bundle(work / "tiny-sd", seed=0)
    (work / "library").mkdir()
    for i in range(args.clips):
        write_synthetic_clip(work / "library" / f"clip{i:02d}.mp4", width=128, height=96, fps=24, seconds=1.0, seed=i)
    print(f"{args.clips} clips, {args.frames} frames at {args.size}x{args.size}, reconstruct on the tiny bundle, "
          f"{os.cpu_count()} cores, torch threads 1")  # fmt: skip
    rows = []
    with prefect_test_harness(server_startup_timeout=120):
        for level in (int(x) for x in args.levels.split(",")):
            spec = load_spec(spec_path("reconstruct"), [
                f"models.sd.id={bundle}", f"store={work / f'store-{level}'}",
                f"stages.decode_video.params.num_frames={args.frames}",
                f"stages.decode_video.params.width={args.size}", f"stages.decode_video.params.height={args.size}",
                "stages.decode_video.params.multiple=8", "stages.encode_video.params.preset=ultrafast",
            ])  # fmt: skip
            start = time.perf_counter()
            report = bulk_edit(library=f"{work}/library/*.mp4", spec=spec, output=str(work / f"out-{level}"),
                               concurrency=level)  # fmt: skip
            wall = time.perf_counter() - start
            pairs = stage_seconds(report)
            share = 1 - sum(inside for _, inside in pairs) / sum(total for total, _ in pairs)
            rows.append((level, wall, args.clips / wall * 60, share))
    base = rows[0][2]
    print(f"{'concurrent':>10} {'wall s':>8} {'clips/min':>10} {'vs 1':>6} {'orchestration share':>20}")
    for level, wall, rate, share in rows:
        print(f"{level:>10} {wall:>8.1f} {rate:>10.1f} {rate / base:>5.2f}x {share:>19.0%}")


if __name__ == "__main__":
    main()
