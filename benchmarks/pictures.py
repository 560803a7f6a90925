"""What the UI's pictures cost: their bytes against the intermediates they show, and the seconds they add.

Each preset's demo (synthetic clip, tiny models, small sizes) runs in a fresh process and store, inside a
Prefect run (so every card is published), with a timer around everything that draws, encodes, keeps or
publishes a picture, preview, card, summary or output copy (the outermost such call counted once, whichever
thread makes it). Printed per preset: the bytes under ``pictures/`` (pictures, previews, cards, summaries and
the output copies) and under ``artifacts/``, their ratio, and the seconds the pictures took against the
stages' own seconds and the run's wall time. Stages run one at a time (``REELFLOW_MAX_CONCURRENCY=1``), so a
stage's seconds are its own.

The demo's intermediates are tiny (8 frames at 96x64, a few steps); at real sizes the intermediates grow with
frames, resolution and steps while the pictures stay a few tiles of at most 256 pixels a side. ``--size 512x512
--frames 16`` decodes a synthetic clip made at that size instead (the presets whose demo sources are drawn at
the demo's size, a mask, need the default size).

Run: ``.venv/bin/python benchmarks/pictures.py [--presets reconstruct fatezero-local ...] [--size WxH --frames N]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("REELFLOW_MAX_CONCURRENCY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reelflow.deployments import preset_names  # noqa: E402
from reelflow.storage.files import human_bytes  # noqa: E402

# Everything the pictures cost, by module and name: drawing, encoding, keeping in the store, publishing.
TIMED = {
    "reelflow.tasks.artifacts": ("contact_sheet", "bar_chart", "overlay", "fit", "latent_view", "as_jpeg",
                                 "picture_markdown", "resolve_pictures"),
    "reelflow.tasks.views": ("thumbnails",),
    "reelflow.tasks.runtime": ("_views",),
    "reelflow.tasks.cards": ("keep_summary", "keep_outputs", "republish_card"),
    "reelflow.flows.previews": ("side_by_side",),
}  # fmt: skip


class Timer:
    """Seconds spent in the wrapped functions, the outermost call of each thread counted once."""

    def __init__(self) -> None:
        self.seconds, self.local, self.lock = 0.0, threading.local(), threading.Lock()

    def wrap(self, fn):  # noqa: ANN001, ANN201
        @functools.wraps(fn)
        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            depth = getattr(self.local, "depth", 0)
            self.local.depth = depth + 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.local.depth = depth
                if depth == 0:
                    with self.lock:
                        self.seconds += time.perf_counter() - started

        return timed

    def install(self) -> None:
        """Wrap each timed function where it is defined and wherever it was imported by name."""
        import importlib

        originals = {}
        for module_name, names in TIMED.items():
            module = importlib.import_module(module_name)
            for name in names:
                originals[id(getattr(module, name))] = self.wrap(getattr(module, name))
        for module in [m for n, m in sys.modules.items() if n.startswith("reelflow.") and m is not None]:
            for attr, value in list(vars(module).items()):
                if id(value) in originals:
                    setattr(module, attr, originals[id(value)])
        from reelflow.tasks.cards import Card

        from reelflow.tasks.views import StepStrip

        Card.show = self.wrap(Card.show)  # the API calls that publish a card
        Card.finish = self.wrap(Card.finish)  # the summary and the output copies kept, the card stored
        StepStrip.keep = self.wrap(StepStrip.keep)  # a kept step's copy off the device


def measure(preset: str, workdir: Path, size: str | None, frames: int | None) -> dict:
    import reelflow.flows.commands  # noqa: F401  (imports every module whose names are timed)
    import reelflow.flows.edit  # noqa: F401
    import reelflow.tasks.stage as stage_registry
    from reelflow.core.synthetic import write_synthetic_clip
    from reelflow.flows.demo import CLIP_SECONDS, prepare_demo
    from reelflow.flows.edit import edit_video
    from reelflow.schemas.loading import load_spec

    stage_registry.load_implementations()
    overrides = []
    if size:
        width, height = (int(v) for v in size.split("x"))
        workdir.mkdir(parents=True, exist_ok=True)  # the demo keeps a clip it finds
        write_synthetic_clip(workdir / "source.mp4", width=width, height=height, fps=24, seconds=CLIP_SECONDS)
        overrides += [f"stages.decode_video.params.width={width}", f"stages.decode_video.params.height={height}"]
    if frames:
        overrides.append(f"stages.decode_video.params.num_frames={frames}")
    spec = prepare_demo(workdir, preset)
    spec = load_spec(spec.model_dump(mode="json"), overrides) if overrides else spec
    timer = Timer()
    timer.install()
    started = time.perf_counter()
    manifest = edit_video(spec)
    wall = time.perf_counter() - started
    store = Path(spec.store)
    return {
        "pictures": _bytes(store / "pictures"),
        "artifacts": _bytes(store / "artifacts"),
        "picture_seconds": timer.seconds,
        "stage_seconds": sum(r.seconds for r in manifest.stages if r.status == "computed"),
        "wall": wall,
    }


def _bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=preset_names(), help="default: every installed preset")
    parser.add_argument("--size", help="decode a synthetic clip of this size, WxH (default: the demo's 96x64)")
    parser.add_argument("--frames", type=int, help="frames to decode (default: the demo's 8)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one preset, in this process
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, Path(args.workdir), args.size, args.frames)))
        return
    print(f"pictures against intermediates, {args.size or '96x64'}, {args.frames or 8} frames; stages one at a time")
    print(f"{'preset':<20} {'artifacts':>10} {'pictures':>10} {'ratio':>7}   {'picture s':>9} {'stage s':>8} "
          f"{'of stages':>9} {'wall s':>7} {'of wall':>8}")  # fmt: skip
    totals = {"pictures": 0, "artifacts": 0, "picture_seconds": 0.0, "stage_seconds": 0.0, "wall": 0.0}
    for preset in args.presets:
        with tempfile.TemporaryDirectory(prefix="reelflow-pictures-") as tmp:  # a fresh process and store per preset
            sized = [*(["--size", args.size] if args.size else []), *(["--frames", str(args.frames)] if args.frames else [])]
            done = subprocess.run([sys.executable, __file__, "--one", preset, "--workdir", tmp, *sized], capture_output=True,
                                  text=True)  # fmt: skip
            if done.returncode != 0:
                sys.exit(f"{preset} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.splitlines()[-1])
        for name in totals:
            totals[name] += row[name]
        _print(preset, row)
    _print("all", totals)


def _print(name: str, row: dict) -> None:
    print(f"{name:<20} {human_bytes(row['artifacts']):>10} {human_bytes(row['pictures']):>10} "
          f"{row['pictures'] / row['artifacts']:>7.3f}   {row['picture_seconds']:>9.2f} {row['stage_seconds']:>8.2f} "
          f"{row['picture_seconds'] / row['stage_seconds']:>9.3f} {row['wall']:>7.2f} {row['picture_seconds'] / row['wall']:>8.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
