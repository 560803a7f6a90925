"""Tiny random MiDaS depth models for tests, in the layout of the official checkpoints.

Each is MiDaS's module tree at toy widths: a timm backbone of 4 blocks of width 32 over a 4x4 grid of
16-pixel patches (native input 64x64), every block hooked, reassembled to widths 8, 16, 32 and 32,
fused at width 16. :func:`build_tiny_midas` is DPT-Large's layout (ViT) with its state dict pickled
as ``model.pt``, the way MiDaS publishes checkpoints, so loading goes through the weights-only path;
:func:`build_tiny_midas_beit` is BEiT-L 512's layout, as ``model.safetensors``, with the
``relative_position_index`` buffers MiDaS's files carry. Both are pure functions of ``seed``: the
same seed writes byte-identical files.

The transformers ones, each with its ``DPTImageProcessor`` and saved with ``save_pretrained``:
:func:`build_tiny_dpt` (``DPTForDepthEstimation``, a ViT of 4 blocks of width 32 over 16-pixel
patches, square 64x64 input as Intel/dpt-large's 384x384) and :func:`build_tiny_depth_anything`
(``DepthAnythingForDepthEstimation`` over a DINOv2 of 4 blocks of width 32 and 14-pixel patches, its
processor keeping the aspect ratio at multiples of 14 around 56x56, as Depth Anything V2's does
around 518x518).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessor,
)

from reelflow.core.depth.midas import MidasDPT, midas_state_dict
from reelflow.core.tiny import _builder_readme, _seeded, _write_staged

TINY_MIDAS_ARGS: dict[str, Any] = {
    "input_size": 64,
    "hooks": [0, 1, 2, 3],
    "reassemble_channels": [8, 16, 32, 32],
    "features": 16,
    "head_channels": 8,
    "backbone_args": {"embed_dim": 32, "depth": 4, "num_heads": 2, "num_classes": 10},
}
VIT_ARCHITECTURE, BEIT_ARCHITECTURE = "dpt_large_384", "dpt_beit_large_512"


def tiny_midas(seed: int = 0, architecture: str = VIT_ARCHITECTURE) -> MidasDPT:
    """The MiDaS model :func:`build_tiny_midas` (or, for BEiT, :func:`build_tiny_midas_beit`) writes, in eval mode."""

    def build() -> MidasDPT:
        model = MidasDPT(architecture, TINY_MIDAS_ARGS)
        # A random head's last ReLU clips most seeds' output to zero everywhere; a positive bias keeps
        # the tiny depth map informative (non-constant) without changing the layout.
        torch.nn.init.constant_(model.scratch.output_conv[4].bias, 1.0)
        return model

    return _seeded(seed, 0, build).eval()


def build_tiny_midas(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random MiDaS DPT (ViT, DPT-Large's layout): ``config.json`` and ``model.pt``.

    Raises:
        ModelError: ``out_dir`` is a file, or a non-empty directory that is not a tiny model.
    """

    def write(staging: Path) -> None:
        _write_config(staging, VIT_ARCHITECTURE)
        torch.save(midas_state_dict(tiny_midas(seed, VIT_ARCHITECTURE)), staging / "model.pt")

    readme = _builder_readme("MiDaS DPT (ViT)", "build_tiny_midas", seed, module=__name__)
    return _write_staged(Path(out_dir), write, readme)


def build_tiny_midas_beit(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random MiDaS DPT (BEiT, BEiT-L 512's layout): ``config.json`` and ``model.safetensors``.

    Raises:
        ModelError: ``out_dir`` is a file, or a non-empty directory that is not a tiny model.
    """

    def write(staging: Path) -> None:
        _write_config(staging, BEIT_ARCHITECTURE)
        save_file(midas_state_dict(tiny_midas(seed, BEIT_ARCHITECTURE)), staging / "model.safetensors")

    readme = _builder_readme("MiDaS DPT (BEiT)", "build_tiny_midas_beit", seed, module=__name__)
    return _write_staged(Path(out_dir), write, readme)


def _write_config(staging: Path, architecture: str) -> None:
    config = {"library": "midas", "architecture": architecture, "model_args": TINY_MIDAS_ARGS}
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# transformers depth models -------------------------------------------------------------------

DPT_SIZE = 64
DEPTH_ANYTHING_SIZE = 56
# ImageNet statistics, as Depth Anything's processor has them; DPT-Large's are 0.5 / 0.5.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_dpt(seed: int = 0) -> DPTForDepthEstimation:
    """The DPT :func:`build_tiny_dpt` writes, in memory (eval mode)."""
    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=DPT_SIZE,
        patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
    )  # fmt: skip
    return _seeded(seed, 0, lambda: _visible_depth(DPTForDepthEstimation(config), lambda m: m.head.head[-2])).eval()


def tiny_depth_anything(seed: int = 0) -> DepthAnythingForDepthEstimation:
    """The Depth Anything :func:`build_tiny_depth_anything` writes, in memory (eval mode)."""
    backbone = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, image_size=DEPTH_ANYTHING_SIZE,
        patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
    )  # fmt: skip
    config = DepthAnythingConfig(
        backbone_config=backbone, patch_size=14, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16, head_hidden_size=8,
    )  # fmt: skip
    build = lambda: _visible_depth(DepthAnythingForDepthEstimation(config), lambda m: m.head.conv3)  # noqa: E731
    return _seeded(seed, 0, build).eval()


def _visible_depth(model: torch.nn.Module, last_conv: Callable[[torch.nn.Module], torch.nn.Conv2d]) -> torch.nn.Module:
    """Random weights whose ReLU output is positive and follows the input.

    transformers' normal(0, 0.02) init shrinks the signal to about 1e-8 through the tiny neck and the
    last ReLU then zeroes most of it; PyTorch's default (fan-in) init keeps it, and a last bias of 1
    keeps the prediction above zero.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            module.reset_parameters()
    torch.nn.init.ones_(last_conv(model).bias)
    return model


def _dpt_processor(size: int, *, keep_aspect_ratio: bool, multiple: int, mean: tuple, std: tuple) -> DPTImageProcessor:
    return DPTImageProcessor(
        size={"height": size, "width": size}, keep_aspect_ratio=keep_aspect_ratio, ensure_multiple_of=multiple,
        image_mean=list(mean), image_std=list(std),
    )  # fmt: skip


def build_tiny_dpt(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``DPTForDepthEstimation`` and its image processor (square 64x64, mean and std 0.5,
    as Intel/dpt-large's at 384x384): config.json, model.safetensors, preprocessor_config.json.

    Raises:
        ModelError: ``out_dir`` is a file, or a non-empty directory that is not a tiny model.
    """

    def write(staging: Path) -> None:
        tiny_dpt(seed).save_pretrained(staging)
        processor = _dpt_processor(DPT_SIZE, keep_aspect_ratio=False, multiple=1, mean=(0.5,) * 3, std=(0.5,) * 3)
        processor.save_pretrained(staging)

    readme = _builder_readme("DPT depth model", "build_tiny_dpt", seed, module=__name__)
    return _write_staged(Path(out_dir), write, readme)


def build_tiny_depth_anything(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``DepthAnythingForDepthEstimation`` and its image processor (about 56x56 keeping the
    aspect ratio, multiples of 14, ImageNet statistics, as Depth-Anything-V2-*-hf's at 518).

    Raises:
        ModelError: ``out_dir`` is a file, or a non-empty directory that is not a tiny model.
    """

    def write(staging: Path) -> None:
        tiny_depth_anything(seed).save_pretrained(staging)
        _dpt_processor(DEPTH_ANYTHING_SIZE, keep_aspect_ratio=True, multiple=14, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD).save_pretrained(staging)  # fmt: skip

    readme = _builder_readme("Depth Anything depth model", "build_tiny_depth_anything", seed, module=__name__)
    return _write_staged(Path(out_dir), write, readme)
