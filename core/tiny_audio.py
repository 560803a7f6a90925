"""Tiny random CLIP-aligned audio encoders in the layouts their authors publish: Soundini's Swin
(``tpami_encoder40.pth``, with its two logit scales) and the CVPR 2022 ResNet18 (``resnet18_57.pth``,
saved through DataParallel, so every key starts with ``module.``). Each is a ``config.json`` naming
the architecture with timm arguments that shrink it, beside the checkpoint, a pure function of its
seed, so tests and ``reelflow demo`` run the real loading code (``torch.load(weights_only=True)``)
with no download.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from reelflow.core.audio.encoders import build_encoder
from reelflow.core.tiny import _builder_readme, _seeded, _write_staged

TINY_ARGS: dict[str, dict[str, Any]] = {
    "swin_tiny": {"img_size": 56, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]},
    "resnet18": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8},
}


def build_tiny_soundclip_swin(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Soundini audio encoder (Swin, 56-pixel input) as ``tpami_encoder40.pth`` + ``config.json``."""
    return _build(Path(out_dir), "swin_tiny", "tpami_encoder40.pth", seed, prefix="")


def build_tiny_soundclip_resnet(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny CVPR 2022 audio encoder (ResNet18 layout, narrow) as ``resnet18_57.pth`` with DataParallel's
    ``module.`` prefix + ``config.json``."""
    return _build(Path(out_dir), "resnet18", "resnet18_57.pth", seed, prefix="module.")


def _build(out: Path, architecture: str, checkpoint: str, seed: int, *, prefix: str) -> Path:
    def write(staging: Path) -> None:
        model = _seeded(seed, 7, lambda: build_encoder(architecture, **TINY_ARGS[architecture]))
        torch.save({f"{prefix}{k}": v.contiguous() for k, v in model.state_dict().items()}, staging / checkpoint)
        config = {"library": "soundclip", "architecture": architecture, "model_args": TINY_ARGS[architecture]}
        (staging / "config.json").write_text(json.dumps(config, indent=2))

    return _write_staged(out, write, _builder_readme(f"{architecture} audio encoder", f"build_tiny_soundclip_{architecture[:4]}",
                                                     seed, module="reelflow.core.tiny_audio"))  # fmt: skip


def build_tiny_clip_vision_512(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random CLIP image encoder projecting to 512, the width of CLIP ViT-B/32's space that the audio
    encoders share, with its image processor (the layout ``save_pretrained`` writes)."""
    from reelflow.core.tiny import _tiny_clip_processor, _tiny_clip_vision_model

    def write(staging: Path) -> None:
        _seeded(seed, 8, lambda: _tiny_clip_vision_model(projection_dim=512)).save_pretrained(staging)
        _tiny_clip_processor().save_pretrained(staging)

    return _write_staged(Path(out_dir), write, _builder_readme("CLIP image encoder (512)", "build_tiny_clip_vision_512",
                                                               seed, module="reelflow.core.tiny_audio"))  # fmt: skip
