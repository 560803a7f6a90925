"""Tiny random Wan 2.1 bundles, image-to-video and VACE, in the layout of the published Diffusers checkpoints.

``build_tiny_wan_i2v(dir)`` writes what ``WanImageToVideoPipeline.save_pretrained`` writes for
``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` (``transformer/`` with a CLIP image projection and 36 input
channels, ``vae/`` (``AutoencoderKLWan``: 16 latent channels, 4x in time, 8x in space), ``text_encoder/``
(UMT5), ``tokenizer/``, ``image_encoder/`` (CLIP vision), ``image_processor/``, ``scheduler/`` (UniPC with
flow sigmas, shift 3)); ``build_tiny_wan_vace(dir)`` what ``WanVACEPipeline`` writes for
``Wan-AI/Wan2.1-VACE-1.3B-diffusers`` (``WanVACETransformer3DModel`` with its control layers, no image
encoder). Widths are cut to a few dozen channels; everything that sets shapes between components (latent
channels, the VAE's scale factors, patch size, text width, the VACE control channels) is the real
models'. Weights are random and seeded; nothing is downloaded. The tokenizer is a T5 tokenizer
(Unigram) over the tiny corpus the Stable Diffusion bundle's tokenizer is trained on.
"""

from __future__ import annotations

import string
from pathlib import Path

from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)
from transformers import CLIPVisionConfig, CLIPVisionModel, T5TokenizerFast, UMT5Config, UMT5EncoderModel

from reelflow.core.tiny import _CORPUS, _builder_readme, _seeded, _tiny_clip_processor, _write_staged
from reelflow.core.wan import MAX_SEQUENCE_LENGTH

TEXT_DIM = 32  # UMT5's width here (4096 in Wan); the transformer's text_dim follows it
FLOW_SHIFT = 3.0  # Wan 2.1 480p's scheduler config
HEADS, HEAD_DIM = 2, 16
VACE_LAYERS = (0, 1)
VACE_IN_CHANNELS = 96  # 16 latent channels of the control video x 2 (inactive, reactive) + 64 of the 8x8 mask


def build_tiny_wan_i2v(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Wan 2.1 image-to-video bundle into ``out_dir`` and return its path."""

    def write(staging: Path) -> None:
        tiny_wan_i2v_pipeline(seed).save_pretrained(staging, safe_serialization=True)

    return _write_staged(Path(out_dir), write, _builder_readme("Wan 2.1 image-to-video bundle", "build_tiny_wan_i2v", seed,
                                                               module="reelflow.core.tiny_wan"))  # fmt: skip


def build_tiny_wan_vace(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Wan 2.1 VACE bundle into ``out_dir`` and return its path."""

    def write(staging: Path) -> None:
        tiny_wan_vace_pipeline(seed).save_pretrained(staging, safe_serialization=True)

    return _write_staged(Path(out_dir), write, _builder_readme("Wan 2.1 VACE bundle", "build_tiny_wan_vace", seed,
                                                               module="reelflow.core.tiny_wan"))  # fmt: skip


def tiny_wan_i2v_pipeline(seed: int = 0) -> WanImageToVideoPipeline:
    """The pipeline :func:`build_tiny_wan_i2v` writes, in memory."""
    return WanImageToVideoPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=_seeded(seed, 0, _tiny_umt5),
        vae=_seeded(seed, 1, _tiny_wan_vae),
        scheduler=wan_scheduler(),
        image_encoder=_seeded(seed, 2, _tiny_clip_vision),
        image_processor=_tiny_clip_processor(),
        transformer=_seeded(seed, 3, lambda: WanTransformer3DModel(in_channels=36, image_dim=32, added_kv_proj_dim=HEADS * HEAD_DIM,
                                                                    **_transformer_shape())),  # fmt: skip
    )


def build_tiny_wan22_i2v(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Wan 2.2 A14B image-to-video bundle (two experts, no image encoder) into ``out_dir``."""

    def write(staging: Path) -> None:
        tiny_wan22_i2v_pipeline(seed).save_pretrained(staging, safe_serialization=True)

    return _write_staged(Path(out_dir), write, _builder_readme("Wan 2.2 A14B image-to-video bundle", "build_tiny_wan22_i2v",
                                                               seed, module="reelflow.core.tiny_wan"))  # fmt: skip


def tiny_wan22_i2v_pipeline(seed: int = 0) -> WanImageToVideoPipeline:
    """Wan 2.2 A14B's layout: ``transformer`` (high noise) and ``transformer_2`` (low noise), switched at
    ``boundary_ratio`` 0.9 of the training timesteps (the published I2V config), no CLIP image encoder."""
    expert = lambda: WanTransformer3DModel(in_channels=36, **_transformer_shape())  # noqa: E731
    return WanImageToVideoPipeline(
        tokenizer=tiny_t5_tokenizer(), text_encoder=_seeded(seed, 0, _tiny_umt5), vae=_seeded(seed, 1, _tiny_wan_vae),
        scheduler=wan_scheduler(), transformer=_seeded(seed, 3, expert), transformer_2=_seeded(seed, 4, expert),
        boundary_ratio=0.9,
    )  # fmt: skip


def tiny_wan_vace_pipeline(seed: int = 0) -> WanVACEPipeline:
    """The pipeline :func:`build_tiny_wan_vace` writes, in memory."""
    return WanVACEPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=_seeded(seed, 0, _tiny_umt5),
        vae=_seeded(seed, 1, _tiny_wan_vae),
        scheduler=wan_scheduler(),
        transformer=_seeded(seed, 3, lambda: WanVACETransformer3DModel(in_channels=16, vace_layers=list(VACE_LAYERS),
                                                                        vace_in_channels=VACE_IN_CHANNELS, **_transformer_shape())),  # fmt: skip
    )


def wan_scheduler() -> UniPCMultistepScheduler:
    """Wan 2.1's scheduler config: UniPC on flow-matching sigmas, shifted (3.0 at 480p, 5.0 at 720p)."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                   flow_shift=FLOW_SHIFT)  # fmt: skip


def _transformer_shape() -> dict:
    return {"patch_size": (1, 2, 2), "num_attention_heads": HEADS, "attention_head_dim": HEAD_DIM, "out_channels": 16,
            "text_dim": TEXT_DIM, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2, "rope_max_seq_len": 64}  # fmt: skip


def _tiny_wan_vae() -> AutoencoderKLWan:
    # Wan's downsampling pattern (8x in space over three stages, 4x in time over the last two) at 8 base channels.
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


def _tiny_umt5() -> UMT5EncoderModel:
    tokenizer = tiny_t5_tokenizer()
    config = UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)  # fmt: skip
    return UMT5EncoderModel(config)


def _tiny_clip_vision() -> CLIPVisionModel:
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                            image_size=32, patch_size=8))  # fmt: skip


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 (Unigram) tokenizer over the tiny corpus, laid out as T5's (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, ``</s>``
    appended): each corpus word is one piece, and single characters spell any other word."""
    words = sorted(set(_CORPUS.split()))
    characters = sorted(set("".join(words)) | set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{word}", -1.0) for word in words] + [(character, -8.0) for character in characters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=MAX_SEQUENCE_LENGTH)
