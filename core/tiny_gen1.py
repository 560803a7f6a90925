"""Tiny random models for Gen-1 style editing: a Stable-Diffusion-style bundle whose UNet takes depth
as a fifth input channel (the layout of stable-diffusion-2-depth), a depth ControlNet for the tiny
bundle's UNet, and an image-variation bundle whose UNet cross-attends to one CLIP image embedding
(the layout of lambdalabs/sd-image-variations-diffusers), and an IP-Adapter for the tiny bundle's UNet
with its image encoder (the layout of h94/IP-Adapter). Same formats as the real ones (diffusers layout, safetensors), each a pure
function of its seed, so tests and ``reelflow demo`` run the real loading code with no download.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from diffusers import ControlNetModel, StableDiffusionImageVariationPipeline, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPImageProcessor

from reelflow.core.tiny import (
    CLIP_IMAGE_SIZE,
    _builder_readme,
    _seeded,
    _tiny_text_encoder,
    _tiny_vae,
    _write_staged,
    _write_tokenizer_files,
    sd15_scheduler,
    tiny_clip_vision,
    tiny_tokenizer,
    tiny_unet,
)


def build_tiny_sd_depth(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD bundle whose UNet has 5 input channels (4 latent + 1 depth), as Depth2Img's."""

    def write(staging: Path) -> None:
        tokenizer = tiny_tokenizer()
        pipeline = StableDiffusionPipeline(
            vae=_seeded(seed, 0, _tiny_vae), text_encoder=_seeded(seed, 1, lambda: _tiny_text_encoder(tokenizer)),
            tokenizer=tokenizer, unet=_seeded(seed, 2, _depth_unet), scheduler=sd15_scheduler(), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipeline.save_pretrained(staging, safe_serialization=True)
        _write_tokenizer_files(staging / "tokenizer")

    return _write_staged(Path(out_dir), write, _builder_readme("depth-conditioned SD bundle", "build_tiny_sd_depth", seed))


def _depth_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_config({**tiny_unet().config, "in_channels": 5})


def _controlnet() -> ControlNetModel:
    controlnet = ControlNetModel.from_unet(tiny_unet(), conditioning_embedding_out_channels=(8, 8, 16, 16))
    # A ControlNet starts with zero output convolutions (Zhang et al. 2023, §3.1): untrained, it would
    # add nothing. Random values instead, so tests see the depth reach the UNet, as a trained one does.
    with torch.no_grad():
        for parameter in controlnet.parameters():
            if not parameter.any():
                parameter.normal_(std=0.05)
    return controlnet


def build_tiny_controlnet(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ControlNet shaped for the tiny bundle's UNet (``config.json`` + safetensors)."""

    def write(staging: Path) -> None:
        _seeded(seed, 3, _controlnet).save_pretrained(staging, safe_serialization=True)

    return _write_staged(Path(out_dir), write, _builder_readme("depth ControlNet", "build_tiny_controlnet", seed))


def build_tiny_image_variations(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny image-variation bundle: VAE, UNet (cross-attention width 32), a CLIP image encoder projecting
    to 32, its image processor and the DDIM config, as StableDiffusionImageVariationPipeline saves them."""

    def write(staging: Path) -> None:
        crop = {"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}
        pipeline = StableDiffusionImageVariationPipeline(
            vae=_seeded(seed, 0, _tiny_vae), image_encoder=_seeded(seed, 1, lambda: _projecting_to(32)),
            unet=_seeded(seed, 2, tiny_unet), scheduler=sd15_scheduler(), safety_checker=None,
            feature_extractor=CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE}, crop_size=crop),
            requires_safety_checker=False,
        )  # fmt: skip
        pipeline.save_pretrained(staging, safe_serialization=True)

    return _write_staged(Path(out_dir), write, _builder_readme("image-variation SD bundle", "build_tiny_image_variations", seed))


def _projecting_to(width: int):  # noqa: ANN202
    from transformers import CLIPVisionModelWithProjection

    config = tiny_clip_vision().config
    config.projection_dim = width
    return CLIPVisionModelWithProjection(config).eval()


IP_ADAPTER_WEIGHTS = "models/ip-adapter_sd15.safetensors"  # where h94/IP-Adapter keeps the SD 1.5 adapter
IP_ADAPTER_TOKENS = 4


def build_tiny_ip_adapter(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random IP-Adapter for the tiny bundle's UNet as h94/IP-Adapter lays one out:
    ``models/ip-adapter_sd15.safetensors`` (``image_proj.*``, ``ip_adapter.<2k+1>.to_{k,v}_ip.weight``) and
    ``models/image_encoder/`` (a CLIP vision model projecting to 32, no image processor: the loader builds CLIP's)."""

    def write(staging: Path) -> None:
        weights = staging / IP_ADAPTER_WEIGHTS
        weights.parent.mkdir(parents=True)
        save_file(_seeded_state(seed, _ip_adapter_state), weights)
        _seeded(seed, 5, lambda: _projecting_to(32)).save_pretrained(weights.parent / "image_encoder", safe_serialization=True)

    return _write_staged(Path(out_dir), write, _builder_readme("IP-Adapter", "build_tiny_ip_adapter", seed))


def _seeded_state(seed: int, build) -> dict[str, torch.Tensor]:  # noqa: ANN001
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1009 + 4)
        return build()


def _ip_adapter_state(image_embed_dim: int = 32) -> dict[str, torch.Tensor]:
    unet = tiny_unet()
    width = unet.config.cross_attention_dim
    state = {"image_proj.proj.weight": torch.randn(IP_ADAPTER_TOKENS * width, image_embed_dim) * 0.2,
             "image_proj.proj.bias": torch.randn(IP_ADAPTER_TOKENS * width) * 0.1,
             "image_proj.norm.weight": 1.0 + torch.randn(width) * 0.1, "image_proj.norm.bias": torch.randn(width) * 0.1}  # fmt: skip
    for index, name in enumerate(unet.attn_processors):  # the authors' numbering: every attention layer, cross odd
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            state[f"ip_adapter.{index}.to_k_ip.weight"] = torch.randn(hidden, width) * 0.3
            state[f"ip_adapter.{index}.to_v_ip.weight"] = torch.randn(hidden, width) * 0.3
    return {k: v.contiguous() for k, v in state.items()}
