"""What comparing methods together saves: every preset on one clip in one comparison vs one by one.

Each preset's demo (synthetic clip, tiny models, small sizes) runs twice, each way in a fresh process:
one by one, each edit in a fresh store of its own (nothing to reuse), and all together through
``compare_methods`` in one store, where a stage several presets plan with the same key (decode, VAE
encoding, depth, flow) runs once. Printed: stage-seconds computed (the sum of each computed stage's
own seconds) and the bytes of the artifacts computed both ways, their ratios, and the wall time of each way. Stages run one
at a time (``REELFLOW_MAX_CONCURRENCY=1`` unless set), so a stage's seconds are its own.

Run: ``.venv/bin/python benchmarks/compare.py [--presets reconstruct fatezero-local ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One stage at a time both ways: stages running at once on a few cores slow each other, and would inflate
# the comparison's stage-seconds (its independent branches overlap more than one edit's do).
os.environ.setdefault("REELFLOW_MAX_CONCURRENCY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reelflow.deployments import preset_names  # noqa: E402
from reelflow.flows.compare import compare_methods  # noqa: E402
from reelflow.flows.demo import prepare_demo  # noqa: E402
from reelflow.flows.edit import edit_video  # noqa: E402
from reelflow.schemas.loading import load_spec  # noqa: E402
from reelflow.schemas.manifest import RunManifest  # noqa: E402
from reelflow.storage.files import human_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=preset_names(), help="default: every installed preset")
    parser.add_argument("--way", choices=("alone", "together"), help=argparse.SUPPRESS)  # one way, in this process
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(measure(args.way, Path(args.workdir), args.presets)))
        return
    with tempfile.TemporaryDirectory(prefix="reelflow-compare-") as tmp:
        for preset in args.presets:
            prepare_demo(Path(tmp), preset)  # the clip and tiny models, made once for both ways
        # Each way in a fresh process, so neither finds models loaded or libraries warmed by the other.
        alone, together = (json.loads(subprocess.run(
            [sys.executable, __file__, "--way", way, "--workdir", tmp, "--presets", *args.presets],
            check=True, capture_output=True, text=True).stdout.splitlines()[-1]) for way in ("alone", "together"))  # fmt: skip

    print(f"\n{len(args.presets)} presets on one clip ({', '.join(args.presets)}); stages one at a time")
    print(f"stages                     {alone['stages']:>10}   distinct in the comparison {together['stages']}")
    print(f"stage-seconds computed     {alone['seconds']:>10.2f}   together {together['seconds']:>8.2f}   "
          f"ratio {alone['seconds'] / together['seconds']:.2f}x")  # fmt: skip
    print(f"artifacts stored           {human_bytes(alone['bytes']):>10}   together {human_bytes(together['bytes']):>8}   "
          f"ratio {alone['bytes'] / max(1, together['bytes']):.2f}x")  # fmt: skip
    print(f"wall seconds               {alone['wall']:>10.1f}   together {together['wall']:>8.1f}   "
          f"ratio {alone['wall'] / together['wall']:.2f}x")  # fmt: skip


def measure(way: str, work: Path, presets: list[str]) -> dict:
    """Stage-seconds computed, bytes stored, stages run and wall seconds of every preset's demo, one way."""
    specs = [prepare_demo(work, preset) for preset in presets]
    started = time.perf_counter()
    if way == "alone":  # each edit in a fresh store of its own: nothing to reuse
        seconds, stored, stages = 0.0, 0, 0
        for spec in specs:
            own = load_spec(spec.model_dump(mode="json"), [f"store={work / 'alone' / spec.name}", f"output={work / 'alone-out'}"])
            manifest = edit_video(spec=own)
            seconds += manifest.cost.computed_seconds
            stored += manifest.cost.stored_bytes
            stages += len(manifest.stages)
        return {"seconds": seconds, "bytes": stored, "stages": stages, "wall": time.perf_counter() - started}
    together = [load_spec(s.model_dump(mode="json"), [f"store={work / 'together'}", f"output={work / 'together-out'}"])
                for s in specs]  # fmt: skip
    comparison = compare_methods(specs=together, name="all-presets")
    stored = sum(r.bytes for r in _first_records(comparison))
    return {"seconds": comparison.computed_seconds, "bytes": stored, "stages": comparison.stages_distinct,
            "wall": time.perf_counter() - started}  # fmt: skip


def _first_records(comparison) -> list:  # noqa: ANN001
    """Each distinct stage's record once (the edit that computed it), from the edits' manifests."""
    seen: dict[str, object] = {}
    for row in comparison.rows:
        for record in RunManifest.model_validate_json(Path(row.manifest).read_text()).stages:
            if record.status == "computed":
                seen.setdefault(record.key, record)
    return list(seen.values())


if __name__ == "__main__":
    main()
