"""A tiny random DINO ViT (transformers' ``ViTModel`` with its ``ViTImageProcessor``) in the layout
``save_pretrained`` writes for ``facebook/dino-vitb16``, a pure function of its seed: the subject
consistency metric's model in tests and ``reelflow demo``, through the same ``from_pretrained`` path.
"""

from __future__ import annotations

from pathlib import Path

from reelflow.core.tiny import _builder_readme, _seeded, _write_staged

DINO_IMAGE_SIZE = 32


def build_tiny_dino(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random DINO ViT (32-pixel input, patches of 8) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    def write(staging: Path) -> None:
        config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                           image_size=DINO_IMAGE_SIZE, patch_size=8)  # fmt: skip
        _seeded(seed, 12, lambda: ViTModel(config)).save_pretrained(staging)
        ViTImageProcessor(size={"height": DINO_IMAGE_SIZE, "width": DINO_IMAGE_SIZE}, image_mean=[0.485, 0.456, 0.406],
                          image_std=[0.229, 0.224, 0.225]).save_pretrained(staging)  # fmt: skip

    return _write_staged(Path(out_dir), write, _builder_readme("DINO ViT", "build_tiny_dino", seed,
                                                               module="reelflow.core.tiny_metrics"))  # fmt: skip
