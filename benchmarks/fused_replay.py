"""FateZero's self-attention stored as queries and keys (replayed through SDPA) vs as maps (the reference).

Printed side by side, on the CPU:

1. stored bytes per inversion step at SD 1.5 shapes (a UNet built from the SD 1.5 config with
   random weights: the shapes, not the weights, set the bytes), 8 frames at 512x512, the released
   zero-shot recording (layers of Nq <= 1024, cross-frame attention from 640 channels, key frame
   'mid'): self-attention maps vs queries and key-frame keys, raw and as stored (float16, Blosc-LZ4);
2. on the tiny bundle: inversion time with recording vs without; edit time replaying from the
   store vs the reference's maps held in RAM;
3. peak memory of a tiny inversion and edit at 1x and 4x tokens per frame, Q/K vs maps, each in a
   fresh process.

The maps path (``MapsRecorder``, ``MapsFusion``) is the tests' reference, imported from
tests/core/test_fatezero_tokens.py: reelflow itself no longer has one.

Run: ``.venv/bin/python benchmarks/fused_replay.py [--skip-sd15]``.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from reelflow.core.attention.processor import install_frame_processors, restore_default_processors  # noqa: E402
from reelflow.core.editing.fatezero import FusionController, RecordingController, fusion_plan  # noqa: E402
from reelflow.core.editing.fatezero_edit import fatezero_edit, fatezero_invert  # noqa: E402
from reelflow.storage.attention import AttentionReader, AttentionWriter  # noqa: E402
from reelflow.storage.store import ArtifactStore  # noqa: E402
from reelflow.tasks.fatezero import _from_store, _to_store  # noqa: E402
from tests.core.test_fatezero_tokens import MapsFusion, MapsRecorder  # noqa: E402  (the maps path lives in tests)

# SD 1.5's UNet config (runwayml/stable-diffusion-v1-5, unet/config.json), shapes only.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "cross_attention_dim": 768,
    "block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}  # fmt: skip


def stored_bytes(work: Path, name: str, records: dict[str, object]) -> tuple[int, int]:
    """(raw float32 bytes, bytes stored) of one step's records written through the attention store."""
    store = ArtifactStore(str(work / name))
    key = f"{len(name):064x}"
    with store.write("invert_latents", key, {}) as writer:
        attention = AttentionWriter(writer, num_steps=1)
        for layer, recorded in records.items():
            attention.write(0, layer, isinstance(recorded, torch.Tensor) and recorded.shape[-1] == 77, _to_store(recorded))
        attention.close()
    return attention.raw_bytes, store.size(store.artifact_path("invert_latents", key))


def sd15_bytes(work: Path, frames: int) -> dict[str, float]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)
    z = torch.randn(frames, 4, 64, 64)
    text = torch.randn(1, 77, 768)
    out = {}
    for name in ("tokens", "maps"):
        recorded: dict[str, object] = {}
        if name == "tokens":
            recorder = RecordingController(1024, {0}, lambda k, layer, c, r: recorded.__setitem__(layer, r))
        else:
            recorder = MapsRecorder({0})
            recorder.inner.max_query_len = 1024
        install_frame_processors(unet, frame_keys=("mid",), min_channels=640, controller=recorder)
        try:
            _one_step(unet, z, text, recorder)
        finally:
            restore_default_processors(unet)
        records = recorded if name == "tokens" else recorder.maps[0]
        self_records = {k: v for k, v in records.items() if k.endswith("attn1")}
        out[f"{name}_raw"], out[f"{name}_stored"] = stored_bytes(work, f"sd15-{name}", self_records)
        out[f"{name}_all_stored"] = stored_bytes(work, f"sd15-{name}-all", records)[1]
    return out


def _one_step(unet, z, text, recorder) -> None:
    """One inversion step's UNet call (the step count does not change the bytes per step)."""
    from reelflow.core.attention.processor import set_num_frames

    recorder.step = 0
    set_num_frames(unet, z.shape[0])
    with torch.no_grad():
        unet(z, 981, encoder_hidden_states=text.expand(z.shape[0], -1, -1))


def tiny_parts(work: Path) -> dict:
    from reelflow.core.models import load_component
    from reelflow.core.tiny import build_tiny_bundle

    bundle = build_tiny_bundle(work / "tiny-sd")
    return {name: load_component(str(bundle), name) for name in ("unet", "tokenizer", "text_encoder", "scheduler")}


def tiny_times(work: Path, frames: int, size: int, steps: int, repeats: int = 3, reference: bool = True) -> dict[str, float]:
    """Inversion with and without recording, and the edit replayed from the store; with ``reference``,
    the same edit from the maps path in RAM too (which holds every self-attention map: not for peaks)."""
    from reelflow.core.text import encode_prompts

    parts = tiny_parts(work)
    unet, tokenizer, text_encoder, scheduler = (parts[k] for k in ("unet", "tokenizer", "text_encoder", "scheduler"))
    z0 = torch.randn(frames, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    source = encode_prompts(tokenizer, text_encoder, ["a cat walking on a street"])
    edit = encode_prompts(tokenizer, text_encoder, ["", "a dog walking on a street"])
    every = set(range(steps))

    def invert(recorder) -> tuple[float, torch.Tensor]:
        install_frame_processors(unet, frame_keys=("mid",), min_channels=0, controller=recorder)
        try:
            started = time.perf_counter()
            z = fatezero_invert(unet, z0, source, scheduler, steps, recorder or _Silent())
            return time.perf_counter() - started, z
        finally:
            restore_default_processors(unet)

    plain = min(invert(None)[0] for _ in range(repeats))
    recording_times = []
    for repeat in range(repeats):
        store = ArtifactStore(str(work / f"tiny-{repeat}"))
        with store.write("invert_latents", "e" * 64, {}) as writer:
            attention = AttentionWriter(writer, num_steps=steps)
            recorder = RecordingController(4096, every, lambda k, layer, c, r: attention.write(k, layer, c, _to_store(r)))
            seconds, z_t = invert(recorder)
            attention.close()
            recording_times.append(seconds)
            layers = dict(attention.layers)
    maps = MapsRecorder(every)
    if reference:
        invert(maps)

    plan, _ = fusion_plan(tokenizer, "a cat walking on a street", "a dog walking on a street", steps,
                          latent_shape=tuple(z0.shape[-2:]), cross_replace_steps=0.8, self_replace_steps=0.8,
                          replace=True)  # fmt: skip
    query_len = {name: (info["is_cross"], info["query_len"]) for name, info in layers.items()}
    group = ArtifactStore(str(work / "tiny-0")).open("invert_latents", "e" * 64)

    def edit_with(controller) -> float:
        install_frame_processors(unet, frame_keys=("mid",), min_channels=0, controller=controller)
        try:
            started = time.perf_counter()
            fatezero_edit(unet, z_t, edit, scheduler, steps, controller, 7.5)
            return time.perf_counter() - started
        finally:
            restore_default_processors(unet)

    recorded = {n: list(every) for n in layers}
    with AttentionReader(group, recorded, plan.source_steps(), transform=torch.from_numpy) as reader:
        in_ram = {k: {n: _from_store(r) for n, r in reader(k).items()} for k in plan.source_steps()}
    from_store, tokens_ram, maps_ram = [], [], []
    for _ in range(repeats):
        with AttentionReader(group, recorded, plan.source_steps(), transform=torch.from_numpy) as reader:
            source_fn = lambda k: {n: _from_store(r) for n, r in reader(k).items()}  # noqa: E731
            from_store.append(edit_with(FusionController(plan, source_fn, query_len)))
        tokens_ram.append(edit_with(FusionController(plan, in_ram.__getitem__, query_len)))
        if reference:
            maps_ram.append(edit_with(MapsFusion(FusionController(plan, maps.maps.__getitem__, query_len))))
    return {"invert_plain": plain, "invert_recording": min(recording_times), "edit_store": min(from_store),
            "edit_tokens_ram": min(tokens_ram), "edit_maps_ram": min(maps_ram) if maps_ram else float("nan")}  # fmt: skip


def maps_path(work: Path, frames: int, size: int, steps: int) -> None:
    """The reference's design on the tiny bundle: every map recorded in RAM, then the edit fused from them."""
    from reelflow.core.text import encode_prompts

    parts = tiny_parts(work)
    unet, tokenizer, text_encoder, scheduler = (parts[k] for k in ("unet", "tokenizer", "text_encoder", "scheduler"))
    z0 = torch.randn(frames, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    maps = MapsRecorder(set(range(steps)))
    install_frame_processors(unet, frame_keys=("mid",), min_channels=0, controller=maps)
    try:
        z_t = fatezero_invert(unet, z0, encode_prompts(tokenizer, text_encoder, ["a cat walking on a street"]),
                              scheduler, steps, maps)  # fmt: skip
    finally:
        restore_default_processors(unet)
    plan, _ = fusion_plan(tokenizer, "a cat walking on a street", "a dog walking on a street", steps,
                          latent_shape=tuple(z0.shape[-2:]), cross_replace_steps=0.8, self_replace_steps=0.8,
                          replace=True)  # fmt: skip
    layers = {n: (r.shape[-1] == 77, r.shape[2]) for n, r in maps.maps[steps - 1].items()}
    fusion = MapsFusion(FusionController(plan, maps.maps.__getitem__, layers))
    install_frame_processors(unet, frame_keys=("mid",), min_channels=0, controller=fusion)
    try:
        fatezero_edit(unet, z_t, encode_prompts(tokenizer, text_encoder, ["", "a dog walking on a street"]), scheduler,
                      steps, fusion, 7.5)  # fmt: skip
    finally:
        restore_default_processors(unet)


class _Silent:
    step = 0


PEAK = """
import json, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
import benchmarks.fused_replay as b
import torch
torch.set_num_threads(1)
work, size, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if mode == "tokens":
    b.tiny_times(work, 4, size, 4, repeats=1, reference=False)
else:
    b.maps_path(work, 4, size, 4)
# VmHWM, not ru_maxrss: ru_maxrss survives fork and exec, so a child of a large parent starts at its size.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps(int(hwm.split()[1]) / 1024))
"""


def edit_peak_mib(work: Path, size: int, mode: str) -> float:
    argv = [sys.executable, "-c", PEAK.format(repo=str(REPO)), str(work / f"peak-{mode}-{size}"), str(size), mode]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="tiny-model frame side for the timings")
    parser.add_argument("--steps", type=int, default=10, help="tiny-model DDIM steps for the timings")
    parser.add_argument("--skip-sd15", action="store_true", help="skip the SD 1.5-shape bytes (a minute or two)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="reelflow-fused-bench-"))
    sizes = None if args.skip_sd15 else sd15_bytes(work, args.frames)
    torch.set_num_threads(1)
    times = tiny_times(work, args.frames, args.size, args.steps)
    peaks = {(mode, tokens): edit_peak_mib(work, size, mode)
             for mode in ("tokens", "maps") for tokens, size in ((1, args.size // 2), (4, args.size))}  # fmt: skip

    if sizes:
        mib = 2**20
        print(f"SD 1.5 shapes (random weights), {args.frames} frames at 512x512, one inversion step, self-attention layers:")
        print(f"  maps   {sizes['maps_raw'] / mib:8.1f} MiB raw float32, {sizes['maps_stored'] / mib:8.1f} MiB stored")
        print(f"  Q + K  {sizes['tokens_raw'] / mib:8.1f} MiB raw float32, {sizes['tokens_stored'] / mib:8.1f} MiB stored: "
              f"{sizes['tokens_stored'] / sizes['maps_stored']:.3f}x of the maps")  # fmt: skip
        print(f"  every recorded layer (cross maps included): {sizes['maps_all_stored'] / mib:.1f} -> "
              f"{sizes['tokens_all_stored'] / mib:.1f} MiB stored per step ({sizes['tokens_all_stored'] / sizes['maps_all_stored']:.3f}x)")  # fmt: skip
    print(f"tiny bundle, {args.frames} frames at {args.size} px, {args.steps} steps, CPU, 1 thread:")
    print(f"  inversion recording Q/K to the store {times['invert_recording']:.3f} s vs not recording "
          f"{times['invert_plain']:.3f} s: {times['invert_recording'] / times['invert_plain']:.2f}x")  # fmt: skip
    print(f"  edit replaying Q/K from the store {times['edit_store']:.3f} s, from RAM {times['edit_tokens_ram']:.3f} s, "
          f"vs the maps in RAM {times['edit_maps_ram']:.3f} s: {times['edit_store'] / times['edit_maps_ram']:.2f}x "
          f"and {times['edit_tokens_ram'] / times['edit_maps_ram']:.2f}x")  # fmt: skip
    for mode in ("tokens", "maps"):
        one, four = peaks[(mode, 1)], peaks[(mode, 4)]
        print(f"  peak RSS of invert + edit ({mode}), 4 frames, 4 steps: {args.size // 2} px (1x tokens) {one:.0f} MiB, "
              f"{args.size} px (4x tokens) {four:.0f} MiB ({four / one:.2f}x)")  # fmt: skip
    print(json.dumps({"sd15": sizes, "tiny": times, "peaks_mib": {f"{m}-{t}x": v for (m, t), v in peaks.items()}}))


if __name__ == "__main__":
    main()
