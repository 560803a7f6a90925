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


def build_tiny_clip_512(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random CLIP (text and image towers) projecting both to 512, the width of CLIP ViT-B/32's space
    that the audio encoders share, with its tokenizer and image processor, in the layout ``save_pretrained`` writes
    for ``openai/clip-vit-base-patch32``: ``CLIPVisionModelWithProjection`` and ``CLIPTextModelWithProjection``
    both load from it."""
    from transformers import CLIPConfig, CLIPModel

    from reelflow.core.tiny import (
        CLIP_IMAGE_SIZE,
        MAX_LENGTH,
        _tiny_clip_processor,
        _write_tokenizer_files,
        tiny_tokenizer,
    )

    def write(staging: Path) -> None:
        tokenizer = tiny_tokenizer()
        text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                "num_attention_heads": 4, "max_position_embeddings": MAX_LENGTH, "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
        vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "image_size": CLIP_IMAGE_SIZE, "patch_size": 8}  # fmt: skip
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)
        _seeded(seed, 8, lambda: CLIPModel(config)).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_tokenizer_files(staging)
        _tiny_clip_processor().save_pretrained(staging)

    return _write_staged(Path(out_dir), write, _builder_readme("CLIP (512)", "build_tiny_clip_512", seed,
                                                               module="reelflow.core.tiny_audio"))  # fmt: skip
