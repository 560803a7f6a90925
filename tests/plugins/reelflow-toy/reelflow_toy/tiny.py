"""The toy method's tiny-model builder: a tiny SD bundle of its own seed stream."""

from __future__ import annotations

from pathlib import Path

from reelflow.methods import build_tiny_bundle


def build(out_dir: Path, seed: int = 0) -> Path:
    return build_tiny_bundle(out_dir, seed=1000 + seed)
