"""FateZero's attention store: size, write speed, edit speed from the store vs from RAM, memory.

All measured side by side in one run on the tiny bundle (CPU), with real records from its UNet
(cross-attention maps, self-attention queries and key-frame keys):

1. bytes per recorded step on disk (float16, Blosc-LZ4 bit-shuffled) vs the same records as raw float32;
2. write throughput of the store vs ``np.save`` of the same float32 bytes;
3. denoising time with maps read from the store (with prefetch) vs the same maps held in RAM
   (FateZero's disk mode is ~10x slower than its RAM mode);
4. peak memory of inversion as the step count grows (each in a fresh subprocess);
5. time to add one more target prompt to a stored inversion vs a full cold run.

Run: ``.venv/bin/python benchmarks/attention_store.py [--frames 8 --size 128 --steps 10]``.
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
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_spec(work: Path, frames: int, size: int, steps: int, edits: int, store: str = "store"):
    from reelflow.deployments import spec_path
    from reelflow.schemas.loading import load_spec

    each = ", ".join(["{}"] + [f"{{target_prompt: a painting of a dog walking on a street number {i}}}" for i in range(1, edits)])
    return load_spec(
        spec_path("fatezero-style"),
        [
            f"models.sd.id={work / 'tiny-sd'}", f"input={work / 'clip.mp4'}", f"store={work / store}",
            f"output={work / 'out'}", f"stages.decode_video.params.num_frames={frames}",
            f"stages.decode_video.params.width={size}", f"stages.decode_video.params.height={size}",
            "stages.decode_video.params.multiple=8", f"stages.invert_latents.params.num_steps={steps}",
            "stages.invert_latents.params.min_channels=0", "stages.invert_latents.params.max_query_len=4096",
            "stages.invert_latents.params.source_prompt=a cat walking on a street",
            "stages.denoise_latents.params.target_prompt=a painting of a cat walking on a street",
            "stages.denoise_latents.params.reweight={painting: 10}", f"stages.denoise_latents.each=[{each}]",
        ],
    )  # fmt: skip


def planned_stages(spec, work: Path) -> dict:
    from reelflow.flows.dag import plan_run
    from reelflow.schemas.calls import SourceRef, StoreSpec
    from reelflow.storage.keys import content_key

    clip = str(work / "clip.mp4")
    source = SourceRef(url=clip, key=content_key(fsspec.filesystem("file"), clip))
    planned = plan_run(spec, sources={"video": source}, store=StoreSpec(url=spec.store), run_id="bench", default_dtype="float32")
    return {p.id: p for p in planned}


def run(stage) -> float:
    from reelflow.tasks import task_for

    started = time.perf_counter()
    task_for(stage.call.stage).fn(call=stage.call)
    return time.perf_counter() - started


def store_vs_numpy(work: Path, stages: dict) -> dict:
    """Sizes and write speed: the inversion artifact vs np.save of the same maps as float32."""
    from reelflow.storage.store import ArtifactStore

    inversion = ArtifactStore(str(work / "store")).open("invert_latents", stages["invert_latents"].key)
    report = dict(inversion.attrs["attention_store"])
    steps = len(inversion.attrs["recorded_steps"])
    steps_of = {True: inversion.attrs["recorded_cross_steps"], False: inversion.attrs["recorded_self_steps"]}
    maps = {f"{group}/{name}": np.asarray(inversion[f"{group}/{name}"][steps_of[info["is_cross"]]], np.float32)
            for name, info in inversion.attrs["layers"].items()
            for group in (("attention",) if info["stored"] == "maps" else ("queries", "keys"))}  # fmt: skip
    target = work / "npsave"
    target.mkdir(exist_ok=True)
    started = time.perf_counter()
    for name, array in maps.items():
        np.save(target / f"{name.replace('/', '.')}.npy", array)
    numpy_seconds = time.perf_counter() - started
    raw = sum(a.nbytes for a in maps.values())
    return {
        "steps": steps,
        "raw_mib_per_step": raw / steps / 2**20,
        "stored_mib_per_step": report["stored_bytes"] / steps / 2**20,
        "store_write_mib_s": raw / 2**20 / max(report["write_seconds"], 1e-9),
        "npsave_write_mib_s": raw / 2**20 / max(numpy_seconds, 1e-9),
    }


def edit_from_store_vs_ram(stages: dict, repeats: int = 3) -> tuple[float, float]:
    """Best-of-``repeats`` time of the first edit with maps streamed from the store, and with every
    map already in RAM (loaded before the clock starts), alternating the two."""
    import reelflow.tasks.fatezero as fz
    from reelflow.storage.attention import AttentionReader
    from reelflow.storage.store import ArtifactStore

    edit = stages["denoise_latents_0"]
    store = ArtifactStore(edit.call.store.url)
    inversion = store.open("invert_latents", stages["invert_latents"].key)
    steps_of = {True: inversion.attrs["recorded_cross_steps"], False: inversion.attrs["recorded_self_steps"]}
    recorded = {name: steps_of[info["is_cross"]] for name, info in inversion.attrs["layers"].items()}
    steps = inversion.attrs["recorded_steps"]
    with AttentionReader(inversion, recorded, steps, transform=torch.from_numpy) as reader:
        preloaded = {step: {name: fz._from_store(r) for name, r in reader(step).items()} for step in steps}
    original = fz._fusion_controller

    def in_ram(inversion, attrs, plan, device):
        controller, reader = original(inversion, attrs, plan, device)
        controller.source = preloaded.__getitem__
        return controller, reader

    def timed_edit() -> float:
        store.remove(store.artifact_path("denoise_latents", edit.key))
        return run(edit)

    from_store, from_ram = [], []
    for _ in range(repeats):
        from_store.append(timed_edit())
        fz._fusion_controller = in_ram
        try:
            from_ram.append(timed_edit())
        finally:
            fz._fusion_controller = original
    return min(from_store), min(from_ram)


PEAK = """
import sys, json
sys.path.insert(0, {repo!r})
import benchmarks.attention_store as b
from pathlib import Path
work = Path(sys.argv[1]); steps = int(sys.argv[2])
stages = b.planned_stages(b.make_spec(work, {frames}, {size}, steps, 1, store=f"peak-{{steps}}"), work)
for name in ("decode_video", "encode_latents", "invert_latents"):
    b.run(stages[name])
# VmHWM, not ru_maxrss: ru_maxrss survives fork and exec, so a child of a large parent starts at its size.
print(json.dumps(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 1024))
"""


def inversion_peak_mib(work: Path, frames: int, size: int, steps: int) -> float:
    code = PEAK.format(repo=str(REPO), frames=frames, size=size)
    done = subprocess.run([sys.executable, "-c", code, str(work), str(steps)], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from reelflow.core.synthetic import write_synthetic_clip
    from reelflow.core.tiny import build_tiny_bundle
    from reelflow.flows.edit import edit_video

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="reelflow-attn-bench-"))
    build_tiny_bundle(work / "tiny-sd")
    write_synthetic_clip(work / "clip.mp4", width=args.size * 3 // 2, height=args.size, seconds=args.frames / 24 + 0.5)

    stages = planned_stages(make_spec(work, args.frames, args.size, args.steps, 1), work)
    for name in ("decode_video", "encode_latents", "invert_latents"):
        run(stages[name])
    sizes = store_vs_numpy(work, stages)
    from_store, from_ram = edit_from_store_vs_ram(stages)
    peaks = {steps: inversion_peak_mib(work, args.frames, args.size, steps) for steps in (5, 10, 20)}

    with prefect_test_harness(server_startup_timeout=120):
        started = time.perf_counter()
        edit_video(make_spec(work, args.frames, args.size, args.steps, 1, store="flow-store"))
        cold = time.perf_counter() - started
        started = time.perf_counter()
        edit_video(make_spec(work, args.frames, args.size, args.steps, 2, store="flow-store"))
        one_more = time.perf_counter() - started

    print(f"FateZero attention store, {args.frames} frames at {args.size}px, {args.steps} steps, tiny UNet, CPU")
    print(f"  per recorded step: {sizes['raw_mib_per_step']:.2f} MiB as float32, "
          f"{sizes['stored_mib_per_step']:.2f} MiB stored: {sizes['stored_mib_per_step'] / sizes['raw_mib_per_step']:.3f}x")
    print(f"  write: store {sizes['store_write_mib_s']:.0f} MiB/s (background thread) vs np.save "
          f"{sizes['npsave_write_mib_s']:.0f} MiB/s: {sizes['store_write_mib_s'] / sizes['npsave_write_mib_s']:.2f}x")
    print(f"  edit with maps from the store {from_store:.2f} s vs in RAM {from_ram:.2f} s: {from_store / from_ram:.2f}x")
    print("  inversion peak RSS by steps: " + ", ".join(f"{s}: {m:.0f} MiB" for s, m in peaks.items()))
    print(f"  add one target prompt to a stored inversion {one_more:.2f} s vs cold run {cold:.2f} s: {one_more / cold:.2f}x")
    print(json.dumps({"sizes": sizes, "store_s": from_store, "ram_s": from_ram, "peaks": peaks, "cold_s": cold, "one_more_s": one_more}))  # noqa: E501


if __name__ == "__main__":
    main()
