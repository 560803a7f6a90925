"""Tiny random CLIP-aligned audio encoders in the layouts their authors publish: Soundini's Swin
(``tpami_encoder40.pth``, with its two logit scales) and the CVPR 2022 ResNet18 (``resnet18_57.pth``,
saved through DataParallel, so every key starts with ``module.``). Each is a ``config.json`` naming
the architecture with timm arguments that shrink it, beside the checkpoint, a pure function of its
seed, so tests and ``reelflow demo`` run the real loading code (``torch.load(weights_only=True)``)
with no download. Also a tiny Perception Encoder Audio-Visual model in the ``facebook/pe-av-*`` layout
(one ``pe_audio_video`` model with its processor), loaded by transformers' ``from_pretrained``.
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


PE_AV_IMAGE_SIZE = 32
PE_AV_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
              "max_position_embeddings": 64}  # fmt: skip
PE_AV_TOWER = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 8}


def tiny_pe_av_config(text_width: int = PE_AV_TEXT["hidden_size"]) -> Any:
    """A ``PeAudioVideoConfig`` of the facebook/pe-av-* layout, shrunk: the DAC codec keeps its 1920-sample hop
    (40 ms at 48 kHz) with 2 base channels, the video tower's timm ``vit_pe_core`` is one 16-wide block on 32-pixel
    images, and the shared space is ``text_width`` wide (the text model's width, 1024 in the published models)."""
    from transformers import PeAudioVideoConfig

    from reelflow.core.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    text = {**PE_AV_TEXT, "hidden_size": text_width, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "cls_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.eos_token_id}  # fmt: skip
    # The timm head keeps transformers 5.24's default of 2 labels: a saved TimmWrapperConfig reads its width back
    # from neither num_classes nor label_names, so any other width would not survive save_pretrained.
    vision = {"architecture": "vit_pe_core_tiny_patch16_384",
              "model_args": {"img_size": PE_AV_IMAGE_SIZE, "embed_dim": 16, "depth": 1, "num_heads": 2}}  # fmt: skip
    audio = {**PE_AV_TOWER, "dac_config": {"encoder_hidden_size": 2, "hidden_size": 8, "codebook_dim": 4}}
    joint = {**PE_AV_TOWER, "audio_config": audio, "video_config": {**PE_AV_TOWER, "vision_config": vision}}
    return PeAudioVideoConfig(text_config=text, audio_video_config=joint)


def tiny_pe_av_processor() -> Any:
    """The processor of the tiny PE-AV model: 48 kHz mono audio, 32-pixel frames normalised with mean and std 0.5
    (as PE's vision towers are), every step switched on explicitly (a loaded video processor does only what its
    config says)."""
    from transformers import PeAudioFeatureExtractor, PeAudioVideoProcessor, PeVideoVideoProcessor

    from reelflow.core.tiny import tiny_tokenizer

    video = PeVideoVideoProcessor(size={"height": PE_AV_IMAGE_SIZE, "width": PE_AV_IMAGE_SIZE}, do_resize=True,
                                  do_center_crop=False, do_rescale=True, do_normalize=True, do_convert_rgb=True,
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])  # fmt: skip
    return PeAudioVideoProcessor(feature_extractor=PeAudioFeatureExtractor(sampling_rate=48_000, hop_length=1920),
                                 video_processor=video, tokenizer=tiny_tokenizer())  # fmt: skip


def _audible(model: torch.nn.Module) -> torch.nn.Module:
    """PyTorch's default (fan-in scaled) initialisation for the 1-d convolutions: with transformers' 0.02 standard
    deviation the tiny DAC codec's four blocks shrink any sound to about 1e-6, so all sounds would embed alike."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv1d):
            module.reset_parameters()
    return model


def build_tiny_pe_av(out_dir: str | Path, seed: int = 0, text_width: int = PE_AV_TEXT["hidden_size"]) -> Path:
    """Write a tiny random Perception Encoder Audio-Visual model as ``save_pretrained`` writes facebook/pe-av-*:
    ``config.json`` (``PeAudioVideoModel``, model_type ``pe_audio_video``), ``model.safetensors`` and the
    ``PeAudioVideoProcessor`` (feature extractor, video processor, tokenizer). ``text_width`` sets the width of
    its shared space (32; the published models' is 1024)."""
    from transformers import PeAudioVideoModel

    def write(staging: Path) -> None:
        config = tiny_pe_av_config(text_width)
        _seeded(seed, 9, lambda: _audible(PeAudioVideoModel(config))).save_pretrained(staging)
        tiny_pe_av_processor().save_pretrained(staging)

    return _write_staged(Path(out_dir), write, _builder_readme("Perception Encoder Audio-Visual", "build_tiny_pe_av",
                                                               seed, module="reelflow.core.tiny_audio"))  # fmt: skip
