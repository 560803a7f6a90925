"""Videoshop, measured: noise extrapolation against naive inversion, peak memory as clips grow, and the
colour jump at window boundaries before and after the correction.

1. Oracle model (methods.md 2.9): the straight-line denoiser ``D(x; sigma) = x0``, so every
   trajectory is ``x0 + sigma * eps``. Both inversions enter the line at the first extrapolation
   step (sigma 1.27 of the Stable Video Diffusion schedule, 25 steps, strength 0.55) and climb to
   sigma 15.59; the error is each frame's RMS distance from the line there, relative to
   ``sigma * RMS(eps)``. (Regenerating is no test under this oracle: any start lands on x0.)
2. Peak memory of the Videoshop stages (embed, invert, denoise) on clips of 1x, 4x and 16x the
   model's frame count, each in a fresh process (a process's peak never goes down), above the
   same process's memory after imports; the clip's own stages (decode, encode) run in another process first.
3. Colour continuity of the 16x clip: the largest change of per-channel mean and std across a window
   boundary against the mean change between two frames inside a window, with no correction (the
   latent rescaling to each window's conditioning frame only), rescaling every window to the edited
   first frame, and matching each window's shared frames to the previous window's output (fading
   out across the window), for latents normalised per channel (the paper) and per frame (the
   reference code). Once with the tiny random VAE, whose decoded colours do not follow its latents,
   and once with core.tiny.PoolingVae, a stand-in that round-trips, so colour behaves as it would
   with a trained VAE (one Euler step there, so the edit is nearly the identity on a smooth clip).

The tiny random SVD bundle (4 frames per window) stands in for the real model: shapes, windows and
memory behave as with the real one, images do not.

Run: ``.venv/bin/python benchmarks/videoshop.py [--size 128 --steps 8]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLIP_STAGES = ("decode_video", "encode_latents", "embed_content")


def oracle_errors(frames: int = 14) -> dict[str, list[float]]:
    import torch
    from diffusers import EulerDiscreteScheduler

    from reelflow.core.inversion.edm import EdmSchedule, InversionState, invert, preconditioning
    from reelflow.core.tiny import svd_scheduler

    schedule = EdmSchedule.from_scheduler(EulerDiscreteScheduler.from_config(svd_scheduler().config), 25)
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(frames, 4, 32, 32, generator=generator), torch.randn(frames, 4, 32, 32, generator=generator)

    def model(sample: torch.Tensor, sigma: float, timestep: float) -> torch.Tensor:
        c_skip, c_out, c_in = preconditioning(sigma, schedule.prediction_type)
        return (x0 - c_skip * sample / c_in) / c_out

    # The first step whose current sigma is above Sigma = 1 (k = 16, sigma_c = 1.273): 8 steps in.
    entry = next(i for i, k in enumerate(range(24, 11, -1)) if schedule.sigmas[k + 1] > 1.0)
    start = InversionState(entry, x0 + schedule.sigmas[24 - entry + 1] * eps)
    errors = {}
    for name, naive in (("extrapolated", False), ("naive", True)):
        x = invert(model, x0, schedule, strength=0.55, noise=eps, naive=naive, resume=start)
        sigma = schedule.sigmas[schedule.start_index(0.55)]
        rms = (x - (x0 + sigma * eps)).pow(2).mean(dim=(1, 2, 3)).sqrt() / (sigma * eps.pow(2).mean().sqrt())
        errors[name] = rms.tolist()
    return errors


def plan(work: Path, store: Path, frames: int, size: int, steps: int, *extra: str) -> dict:
    import fsspec

    from reelflow.deployments import spec_path
    from reelflow.flows.dag import plan_run
    from reelflow.schemas.calls import SourceRef, StoreSpec
    from reelflow.schemas.loading import load_spec
    from reelflow.storage.keys import content_key

    spec = load_spec(spec_path("videoshop"), [
        f"models.svd.id={work / 'svd'}", f"sources.edited_frame.path={work / 'edit.png'}",
        f"stages.decode_video.params.num_frames={frames}", f"stages.decode_video.params.width={size}",
        f"stages.decode_video.params.height={size}", "stages.decode_video.params.multiple=8",
        f"stages.invert_latents.params.num_steps={steps}", *extra])  # fmt: skip
    fs = fsspec.filesystem("file")
    sources = {"video": SourceRef(url=str(work / "clip.mp4"), key=content_key(fs, str(work / "clip.mp4"))),
               "edited_frame": SourceRef(url=str(work / "edit.png"), key=content_key(fs, str(work / "edit.png")), kind="image")}  # fmt: skip
    planned = plan_run(spec, sources=sources, store=StoreSpec(url=str(store)), run_id="bench", default_dtype="float32")
    return {p.id: p for p in planned}


def child(work: Path, phase: str, frames: int, size: int, steps: int, colour: str, norm: str, vae: str) -> None:
    """One case in this fresh process: the clip's stages, or the edit's with its peak memory printed."""
    import reelflow.tasks  # noqa: F401  (imports before the baseline)
    from reelflow.tasks import task_for

    extra = [f"stages.denoise_latents.params.window_colour={colour}", f"stages.invert_latents.params.normalisation={norm}"]
    if vae == "pooling":
        _fill_vae_roles_with_pooling_vae()
        extra += ["stages.invert_latents.params.num_steps=25", "stages.invert_latents.params.strength=0.04"]
    store = work / f"store-{vae}"  # the stand-in VAE does not enter the stage keys: a store of its own
    stages = plan(work, store, frames, size, steps, *extra)
    ids = ("decode_video", "encode_latents") if phase == "clip" else ("embed_content", "invert_latents", "denoise_latents")
    before = _rss_mib()
    refs = {sid: task_for(stages[sid].call.stage).fn(call=stages[sid].call) for sid in ids}
    if phase == "edit":
        from reelflow.storage.store import ArtifactStore

        edit = ArtifactStore(str(store)).open("denoise_latents", refs["denoise_latents"].key)
        print(json.dumps({"peak_mib": _peak_mib() - before, "colour": edit.attrs["colour"],
                          "windows": edit["condition_frames"].shape[0]}))  # fmt: skip


def _fill_vae_roles_with_pooling_vae() -> None:
    from reelflow.core.tiny import PoolingVae
    from reelflow.tasks import runtime

    original = runtime.load_role

    def load_role(model, role, component, *args, **kwargs):  # noqa: ANN001, ANN202
        return PoolingVae() if role == "vae" and component is None else original(model, role, component, *args, **kwargs)

    runtime.load_role = load_role


def _rss_mib() -> float:
    return _status("VmRSS")


def _peak_mib() -> float:
    return _status("VmHWM")


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_child(work: Path, *args: object) -> dict | None:
    done = subprocess.run([sys.executable, __file__, "--child", str(work), *map(str, args)], capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"case {args} failed:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def prepare(work: Path, frames: int, size: int) -> None:
    from reelflow.core.synthetic import write_edited_first_frame
    from reelflow.core.synthetic import write_synthetic_clip
    from reelflow.core.tiny import build_tiny_svd

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "svd").is_dir():
        build_tiny_svd(work / "svd")
    write_synthetic_clip(work / "clip.mp4", width=size, height=size, fps=24, seconds=frames / 24)
    write_edited_first_frame(work / "clip.mp4", work / "edit.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels")
    parser.add_argument("--steps", type=int, default=8, help="Euler steps of the schedule (strength 0.55 of them run)")
    parser.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work, phase, frames, size, steps, colour, norm, vae = args.child
        child(Path(work), phase, int(frames), int(size), int(steps), colour, norm, vae)
        return

    errors = oracle_errors()
    extrapolated, naive = np.asarray(errors["extrapolated"]), np.asarray(errors["naive"])
    print("1. oracle straight-line model, inversion error at sigma 15.59 per frame (relative):")
    print("   frame         " + " ".join(f"{i:>7d}" for i in range(len(naive))))
    print("   extrapolated  " + " ".join(f"{e:7.1e}" for e in extrapolated))
    print("   naive         " + " ".join(f"{e:7.4f}" for e in naive))
    print(f"   naive / extrapolated (mean over frames): {naive.mean() / max(extrapolated.mean(), 1e-12):.3g}x")

    root = Path(tempfile.mkdtemp(prefix="reelflow-videoshop-bench-"))
    length = 4  # the tiny model's frame count
    print(f"\n2. peak memory of embed + invert + denoise, {args.size}x{args.size} frames, windows of {length}:")
    results = {}
    for factor in (1, 4, 16):
        work = root / f"x{factor}"
        prepare(work, length * factor, args.size)
        run_child(work, "clip", length * factor, args.size, args.steps, "boundary", "per_frame", "tiny")
        results[factor] = run_child(work, "edit", length * factor, args.size, args.steps, "boundary", "per_frame", "tiny")
        print(f"   {factor:>2d}x ({length * factor:>3d} frames, {results[factor]['windows']:>2d} windows): "
              f"{results[factor]['peak_mib']:7.1f} MiB")  # fmt: skip
    print(f"   16x / 1x: {results[16]['peak_mib'] / max(results[1]['peak_mib'], 1e-6):.2f}")

    print(f"\n3. colour continuity of the {16 * length}-frame clip (change of per-channel mean + std, 0-255):")
    work = root / "x16"
    for vae in ("tiny", "pooling"):
        if vae == "pooling":
            run_child(work, "clip", 16 * length, args.size, args.steps, "boundary", "per_channel", vae)
        for norm in ("per_channel", "per_frame"):
            for colour in ("none", "first_frame", "boundary"):
                c = run_child(work, "edit", 16 * length, args.size, args.steps, colour, norm, vae)["colour"]
                print(f"   {vae:<7s} {norm:<11s} {colour:<11s} boundary largest {c['boundary_max']:6.2f}, mean "
                      f"{c['boundary_mean']:6.2f}; inside a window mean {c['within_mean']:6.2f}, largest "
                      f"{c['within_max']:6.2f}; boundary mean / inside mean {c['boundary_mean'] / max(c['within_mean'], 1e-6):5.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
