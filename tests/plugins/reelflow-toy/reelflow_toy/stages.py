"""The toy method's stage bodies, registered through reelflow.methods."""

from __future__ import annotations

import numpy as np

from reelflow.methods import StageContext, Window, WindowPlan, read_image, read_window, run_stage, run_windows, stage_task

from reelflow_toy.declarations import ToyInversion


def tint(frames: np.ndarray, colour: np.ndarray, strength: float) -> np.ndarray:
    """``frames`` (uint8 ``(N, H, W, 3)``, the window's anchor first) moved toward ``colour`` scaled by the
    first frame's mean brightness."""
    anchor = frames[0].astype(np.float32).mean() / 255.0
    target = colour.astype(np.float32) * (0.5 + anchor)
    out = (1 - strength) * frames.astype(np.float32) + strength * target
    return np.clip(out.round(), 0, 255).astype(np.uint8)


@stage_task("tint_frames")
def tint_frames(call):
    return run_stage(call, _tint, resumable=True)


def _tint(ctx: StageContext) -> None:
    p = ctx.call.stage.params
    frames = ctx.input("frames")["frames"]
    with ctx.open_source("reference") as handle:
        colour = read_image("reference", handle).reshape(-1, 3).mean(axis=0)
    out = ctx.writer.create_array("frames", shape=frames.shape, dtype=np.uint8, dims=("frame", "y", "x", "rgb"))
    plan = WindowPlan(p.window, p.overlap, anchor=p.anchor)

    def compute(window: Window) -> np.ndarray:
        return tint(read_window(frames, window), colour, p.strength)

    run_windows(ctx, plan, out, compute)


@stage_task("invert_latents", "toy")
def invert_latents(call):
    return run_stage(call, _invert, resumable=True)


def _invert(ctx: StageContext) -> ToyInversion:
    p = ctx.call.stage.params
    z0 = ctx.array("latents", "latents", "float32")
    steps = ctx.writer.create_array("latents", shape=(p.num_steps + 1, *z0.shape), dtype=np.float32,
                                    dims=("level", "frame", "latent_channel", "y", "x"), chunks=(1, *z0.shape))  # fmt: skip
    steps[0] = z0
    for k in range(p.num_steps):
        if not ctx.writer.is_done(f"step-{k}"):
            steps[k + 1] = np.asarray(steps[k]) * p.decay
            ctx.writer.mark_done(f"step-{k}")
    return ToyInversion(num_steps=p.num_steps)
