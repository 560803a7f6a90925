"""A tiny random guided-diffusion ADM UNet in the layout OpenAI releases (a ``torch.save``-d state dict under
guided-diffusion's own key names, beside a ``config.json`` of its flags), a pure function of its seed,
so tests and ``reelflow demo --preset soundini`` run the real loading code (``torch.load(weights_only=True)``
and the renaming onto diffusers' ``UNet2DModel``) with no download.

Two levels of 32 and 64 channels with attention on the second (as the full model has it on its last
three), scale-shift norm, resampling residual blocks and learned variance, like
``256x256_diffusion_uncond.pt``; a 64-pixel native size, and any side divisible by 2 runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from reelflow.core.models.guided_diffusion_family import adm_config, layout
from reelflow.core.tiny import _builder_readme, _seeded, _write_staged

TINY_FLAGS = {
    "library": "guided_diffusion",
    "image_size": 64,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2",
    "attention_resolutions": "32",
    "num_head_channels": 16,
    "learn_sigma": True,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
}
CHECKPOINT = "tiny_diffusion_uncond.pt"


def build_tiny_adm(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny ADM UNet as ``tiny_diffusion_uncond.pt`` (guided-diffusion keys) + ``config.json``."""

    def write(staging: Path) -> None:
        weights = _seeded(seed, 11, _random_weights)
        torch.save(weights, staging / CHECKPOINT)
        (staging / "config.json").write_text(json.dumps(TINY_FLAGS, indent=2))

    return _write_staged(Path(out_dir), write, _builder_readme("guided-diffusion ADM UNet", "build_tiny_adm", seed,
                                                               module="reelflow.core.tiny_adm"))  # fmt: skip


def _random_weights() -> dict[str, torch.Tensor]:
    """Every tensor of the layout, in guided-diffusion's order: norms near one, weights scaled by their fan-in (so
    activations keep their size through the blocks; the released model's zero-initialised output convolutions would
    make a random one output nothing), small biases."""
    out: dict[str, torch.Tensor] = {}
    for name, _, shape in layout(adm_config(TINY_FLAGS)):
        if len(shape) == 1:
            norm = name.endswith((".norm.weight", ".in_layers.0.weight", ".out_layers.0.weight")) or name == "out.0.weight"
            out[name] = float(norm) + 0.05 * torch.randn(shape)
        else:
            out[name] = torch.randn(shape) / math.sqrt(math.prod(shape[1:]))
    return out
