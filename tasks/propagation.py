"""What first-frame propagation shares between backbones (Videoshop on Stable Video Diffusion, wan-propagate on Wan
image-to-video): windows of the model's frame count, the edited frame resized like the video, seeded streams, and the
edit's stores with the window-boundary colour correction and its measurement.

Windows all have the model's frame count (:func:`plan_full_windows`); each after the first is conditioned on the
previous window's output at the first frame they share, and its colour is matched to that output by
:meth:`PropagationStore.keep` (``boundary``: a per-channel map fitted on the shared frames, fading out by the frames
it shares with the next window, so maps never compound), which stores the mismatch before and after.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import zarr

from reelflow.core.editing.videoshop import apply_colour_map, boundary_jumps, channel_stats, colour_map, fade_weights
from reelflow.core.frames import plan_resize, resize_frames
from reelflow.core.inversion.edm import InversionState
from reelflow.core.windows import Window, WindowPlan
from reelflow.schemas.kinds import VideoFrames
from reelflow.tasks.artifacts import contact_sheet, markdown_table
from reelflow.tasks.runtime import StageContext

WindowColour = Literal["boundary", "first_frame", "none"]
LATENT_DIMS = ("latent_channel", "y", "x")
IDENTITY = np.array([[1.0] * 3, [0.0] * 3], np.float32)  # a colour map that changes nothing: scale 1, shift 0


def plan_full_windows(length: int, overlap: int, count: int) -> tuple[WindowPlan, list[Window]]:
    """Windows of the model's frame count over ``count`` frames, the last moved back to end at the clip's end;
    refuses a clip shorter than one window, or an overlap that leaves a window short."""
    if count < length:
        raise ValueError(
            f"the clip gives {count} frames but the model works on {length} at a time (its num_frames, or "
            f"params.window); take at least {length} frames (decode_video.params.num_frames) or a longer clip"
        )
    if 2 * overlap > length:
        raise ValueError(f"overlap {overlap} is more than half the window of {length} frames; lower params.overlap")
    plan = WindowPlan(length, overlap, last="full")
    windows = plan.windows(count)
    if any(w.stop - w.start < length for w in windows):
        raise ValueError(f"windows of {length} frames overlapping by {overlap} cannot cover {count} frames with full "
                         "windows that each share frames with their neighbours only; use overlap 1 (always fits)")  # fmt: skip
    return plan, windows


def resize_like(image: np.ndarray, video: VideoFrames) -> tuple[np.ndarray, Any]:
    """``image`` (uint8 ``(H, W, 3)``) resized to the video's frames by the video's policy (scale, then crop or pad)."""
    width, height = video.resize.output
    plan = plan_resize(image.shape[1], image.shape[0], width=width, height=height, fit=video.resize.fit, multiple=1)
    return resize_frames(image[None], plan)[0], plan


def seeded_generator(seed: int, purpose: str, index: int) -> torch.Generator:
    """The random stream of one ``purpose`` (a proxy's noise, a conditioning frame's augmentation) in window
    ``index``: the same on every attempt, and no two purposes share one."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


def mismatch(own: np.ndarray, reference: np.ndarray) -> float:
    """Largest per-channel |mean difference| + |std difference| between two sets of frames."""
    a, b = channel_stats(own).mean(axis=0), channel_stats(reference).mean(axis=0)
    return float(np.abs(a - b).sum(axis=0).max())


@dataclass
class PropagationStore:
    """A propagation's arrays besides the stitched ``frames``: each window's latents, the frame it was conditioned
    on, its colour map and the boundary mismatch before and after it."""

    frames: zarr.Array
    latents: zarr.Array
    conditions: zarr.Array
    colour: zarr.Array
    mismatch: zarr.Array

    @classmethod
    def create(cls, ctx: StageContext, windows: list[Window], image: tuple[int, ...], latent: tuple[int, ...],
               latent_dims: tuple[str, ...]) -> PropagationStore:  # fmt: skip
        create, count = ctx.writer.create_array, windows[-1].stop
        return cls(
            create("frames", shape=(count, *image), dtype=np.uint8, dims=("frame", "y", "x", "rgb")),
            create("window_latents", shape=(len(windows), *latent), dtype=np.float32, dims=("window", *latent_dims),
                   chunks=(1, *latent)),
            create("condition_frames", shape=(len(windows), *image), dtype=np.uint8, dims=("window", "y", "x", "rgb")),
            create("colour_maps", shape=(len(windows), 2, 3), dtype=np.float32, dims=("window", "scale_shift", "rgb")),
            create("boundary_mismatch", shape=(len(windows), 2), dtype=np.float32, dims=("window", "before_after")),
        )  # fmt: skip

    def keep(self, window: Window, frames: np.ndarray, previous: np.ndarray | None, colour: WindowColour,
             latents: np.ndarray, condition: np.ndarray) -> np.ndarray:  # fmt: skip
        """Store window ``window``'s latents and condition frame; match its decoded ``frames`` to ``previous`` (the
        previous window's output on the frames they share) by ``colour`` and return them."""
        applied = IDENTITY
        if previous is not None:
            before = mismatch(frames[: window.head], previous)
            if colour == "boundary":
                applied = colour_map(frames[: window.head], previous)
                frames = apply_colour_map(frames, applied, fade_weights(len(frames), window.head, window.tail))
            self.mismatch[window.index] = [before, mismatch(frames[: window.head], previous)]
        self.latents[window.index] = latents
        self.conditions[window.index] = condition
        self.colour[window.index] = applied
        return frames

    def publish(self, ctx: StageContext, windows: list[Window], colour: WindowColour) -> None:
        """Per-frame colour statistics, boundary jumps against changes inside windows, and a table of them."""
        stats = np.concatenate([channel_stats(np.asarray(self.frames[i : i + 16])) for i in range(0, self.frames.shape[0], 16)])
        ctx.writer.write_array("frame_stats", stats, dims=("frame", "mean_std", "rgb"))
        jumps = boundary_jumps(stats, [(w.start, w.stop) for w in windows])
        found = np.asarray(self.mismatch[:])
        rows = [(w.index, f"{w.start}-{w.stop - 1}", w.head, f"{found[w.index, 0]:.2f}", f"{found[w.index, 1]:.2f}")
                for w in windows[1:]]  # fmt: skip
        sheet = ctx.picture("condition-frames", contact_sheet(np.asarray(self.conditions[:]),
                                                              labels=[f"window {w.index} (frame {w.start})" for w in windows]))
        ctx.publish("\n".join([
            f"**{len(windows)} windows**, colour kept by `{colour}`", "",
            markdown_table(("window", "frames", "shared", "mismatch before", "after"), rows) if rows else "one window", "",
            f"colour change across boundaries: largest {jumps['boundary_max']:.2f}, mean {jumps['boundary_mean']:.2f}; "
            f"between frames inside a window: mean {jumps['within_mean']:.2f}, largest {jumps['within_max']:.2f}", "",
            "**the frame each window is conditioned on**", "", sheet]))  # fmt: skip
        ctx.record(colour=jumps)


@dataclass
class InversionStore:
    """A windowed inversion's arrays: every step of every window (``steps (window, level, frame, C, h, w)``, level 0
    the normalised clean latents), the normalisation statistics and, when checked, each frame's reconstruction
    error; and the steps done, so an interrupted inversion resumes at its last stored step. ``to_model`` and
    ``from_model`` map stored latents ``(F, C, h, w)`` to the model's layout and back."""

    steps: zarr.Array
    mean: zarr.Array
    std: zarr.Array
    errors: zarr.Array | None
    count: int
    to_model: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    from_model: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    @classmethod
    def create(cls, ctx: StageContext, windows: int, count: int, frames: int, latent: tuple[int, ...], normalisation: str,
               check: bool, frame_dim: str, **layout: Callable[[torch.Tensor], torch.Tensor]) -> InversionStore:  # fmt: skip
        """Arrays for ``windows`` windows of ``count`` steps on ``frames`` latent frames ``latent`` ``(C, h, w)`` each."""
        stats = (windows, *((frames, 1) if normalisation == "per_frame" else (1, latent[0])), 1, 1)
        create, dims = ctx.writer.create_array, ("window", frame_dim, *LATENT_DIMS)
        return cls(
            create("steps", shape=(windows, count + 1, frames, *latent), dtype=np.float32, dims=(dims[0], "level", *dims[1:]),
                   chunks=(1, 1, frames, *latent)),
            create("norm_mean", shape=stats, dtype=np.float32, dims=dims),
            create("norm_std", shape=stats, dtype=np.float32, dims=dims),
            create("reconstruction_error", shape=(windows, frames), dtype=np.float32, dims=dims[:2]) if check else None,
            count,
            **layout,
        )  # fmt: skip

    def begin(self, index: int, x0: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store window ``index``'s normalised clean latents and the statistics they were normalised by."""
        self.steps[index, 0] = x0.numpy()
        self.mean[index] = mean.expand(self.mean.shape[1:]).numpy()
        self.std[index] = std.expand(self.std.shape[1:]).numpy()

    def resume(self, ctx: StageContext, index: int) -> InversionState | None:
        """Where window ``index``'s inversion stands: after its last step marked done, or None for a fresh start."""
        done = next((k for k in range(self.count) if not ctx.writer.is_done(f"window-{index}-step-{k}")), self.count)
        ctx.progress.advance(done)
        return InversionState(done, self.to_model(torch.from_numpy(np.asarray(self.steps[index, done])))) if done else None

    def stream(self, ctx: StageContext, index: int) -> Callable[[int, float, torch.Tensor], None]:
        """``on_step`` of window ``index``: store each step's latents, then mark the step done."""

        def on_step(i: int, sigma: float, x: torch.Tensor) -> None:
            stored = self.from_model(x)
            self.steps[index, i + 1] = stored.numpy()
            ctx.steps.keep(i, stored, f"step {i + 1} · σ={float(sigma):.3g}", part=index)
            ctx.writer.mark_done(f"window-{index}-step-{i}")
            ctx.progress.advance()

        return on_step
