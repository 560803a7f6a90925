"""compute_metrics' model calls, measured at the real models' shapes with random weights (CLIP ViT-B/32 from
``CLIPConfig()``'s defaults, DINO ViT-B/16 from ``ViTConfig()``'s): seconds per frame of the CLIP image
embeddings and DINO features the metrics read, one frame per call against ``--batch`` frames per call, side by
side in one run.

Run: ``.venv/bin/python benchmarks/metrics.py [--frames 16 --batch 8 --side 256]``.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch


class _Context:
    """The two calls the embedding helpers make on a stage context: a model by role, and its processor."""

    def __init__(self, models: dict[str, object]) -> None:
        self.models = models

    def model(self, role: str, component: str | None = None, **_: object) -> object:
        return self.models[f"{role}/{component}" if component else role]


def _models() -> _Context:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    return _Context({
        "clip": CLIPModel(CLIPConfig()).eval(), "clip/image_processor": CLIPImageProcessor(),
        "dino": ViTModel(ViTConfig(), add_pooling_layer=False).eval(), "dino/image_processor": ViTImageProcessor(),
    })  # fmt: skip


def seconds_per_frame(ctx: _Context, frames: np.ndarray, batch: int, repeats: int) -> tuple[float, float]:
    from reelflow.tasks.metrics import MetricInputs, _clip_images, _dino

    best_clip = best_dino = float("inf")
    params = SimpleNamespace(batch_size=batch)
    for _ in range(repeats):
        started = time.perf_counter()
        _clip_images(ctx, frames, batch)
        best_clip = min(best_clip, time.perf_counter() - started)
        started = time.perf_counter()
        _dino(MetricInputs(ctx, params, frames, frames))  # type: ignore[arg-type]
        best_dino = min(best_dino, time.perf_counter() - started)
    return best_clip / len(frames), best_dino / len(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    ctx = _models()
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, args.side, args.side, 3), dtype=np.uint8)
    one = seconds_per_frame(ctx, frames, 1, args.repeats)
    batched = seconds_per_frame(ctx, frames, args.batch, args.repeats)
    print(f"{args.frames} frames of {args.side}x{args.side}, CLIP ViT-B/32 and DINO ViT-B/16 shapes (best of {args.repeats})")
    for name, a, b in (("CLIP image embeddings", one[0], batched[0]), ("DINO features", one[1], batched[1])):
        print(f"  {name:<22} batch 1: {1000 * a:7.1f} ms/frame   batch {args.batch}: {1000 * b:7.1f} ms/frame   ({a / b:.2f}x)")


if __name__ == "__main__":
    main()
