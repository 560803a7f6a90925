"""The tiny Stable Video Diffusion bundle: its layout, its scheduler, its seeding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from reelflow.core.models import clear_model_cache, load_model
from reelflow.core.tiny import CLIP_IMAGE_SIZE, build_tiny_svd, is_tiny_bundle, svd_scheduler

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_svd(tmp_path_factory.mktemp("tiny") / "svd", seed=0)


@pytest.fixture(autouse=True)
def empty_cache():
    clear_model_cache()
    yield
    clear_model_cache()


def load(bundle: Path, component: str) -> Any:
    return load_model(str(bundle), family="diffusers", component=component)


def public(config: Any) -> dict[str, Any]:
    # diffusers' own bookkeeping (_class_name, _use_default_values) is not part of the config.
    return {key: value for key, value in config.items() if not key.startswith("_")}


@pytest.mark.parametrize(
    ("component", "cls"),
    [
        ("unet", UNetSpatioTemporalConditionModel),
        ("vae", AutoencoderKLTemporalDecoder),
        ("image_encoder", CLIPVisionModelWithProjection),
        ("feature_extractor", CLIPImageProcessor),
        ("scheduler", EulerDiscreteScheduler),
    ],
)
def test_each_component_loads_as_its_svd_class(bundle: Path, component: str, cls: type) -> None:
    assert isinstance(load(bundle, component), cls)


def test_bundle_is_marked_as_a_tiny_model(bundle: Path) -> None:
    assert is_tiny_bundle(bundle)


def test_scheduler_is_svds_euler_with_karras_sigmas(bundle: Path) -> None:
    scheduler = load(bundle, "scheduler")

    assert public(scheduler.config) == public(svd_scheduler().config)
    assert scheduler.config.prediction_type == "v_prediction"
    scheduler.set_timesteps(25)
    # Karras et al. 2022 eq. 5 with rho 7 between 700 and 0.002, then the final sigma 0.
    assert scheduler.sigmas.shape == (26,)
    assert scheduler.sigmas[0].item() == pytest.approx(700.0, abs=0.01)
    assert scheduler.sigmas[12].item() == pytest.approx(15.59, abs=0.01)
    assert scheduler.sigmas[-1].item() == 0.0
    # Continuous timesteps are the EDM noise level c_noise = log(sigma) / 4.
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1].log() / 4)


def test_unet_conditions_on_the_image_encoder_and_the_vae_latents(bundle: Path) -> None:
    unet = load(bundle, "unet")
    vae = load(bundle, "vae")
    image_encoder = load(bundle, "image_encoder")
    feature_extractor = load(bundle, "feature_extractor")

    assert unet.config.num_frames == 4
    assert image_encoder.config.projection_dim == unet.config.cross_attention_dim
    # Noisy latents beside the conditioning frame's latents.
    assert unet.config.in_channels == 2 * vae.config.latent_channels
    assert unet.config.out_channels == vae.config.latent_channels
    # fps, motion bucket id and noise augmentation strength, each embedded in addition_time_embed_dim.
    assert unet.config.projection_class_embeddings_input_dim == 3 * unet.config.addition_time_embed_dim
    assert image_encoder.config.image_size == CLIP_IMAGE_SIZE
    assert feature_extractor.crop_size == {"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}


def test_unet_has_spatial_and_temporal_attention(bundle: Path) -> None:
    unet = load(bundle, "unet")
    names = unet.attn_processors.keys()

    for block in ("transformer_blocks", "temporal_transformer_blocks"):
        levels = {name.split(".")[0] for name in names if f".{block}." in name}
        assert levels == {"down_blocks", "mid_block", "up_blocks"}, block


def test_vae_downscales_by_8_and_decodes_clips(bundle: Path) -> None:
    vae = load(bundle, "vae")
    frames = torch.rand(3, 3, 64, 96) * 2 - 1

    with torch.no_grad():
        latents = vae.encode(frames).latent_dist.mode()
        decoded = vae.decode(latents, num_frames=3).sample

    assert latents.shape == (3, 4, 8, 12)
    assert decoded.shape == (3, 3, 64, 96)
    assert vae.config.scaling_factor == 0.18215


def test_stock_pipeline_generates_a_clip_from_the_bundle(bundle: Path) -> None:
    pipe = StableVideoDiffusionPipeline.from_pretrained(bundle)
    pipe.set_progress_bar_config(disable=True)
    # A tensor image skips the pipeline's fixed 224-pixel resize for the CLIP encoder.
    image = torch.rand(1, 3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE)

    frames = pipe(
        image=image,
        height=64,
        width=96,
        num_frames=4,
        num_inference_steps=1,
        decode_chunk_size=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).frames

    assert frames.shape == (1, 4, 3, 64, 96)
    assert torch.isfinite(frames).all()


def test_same_seed_rebuilds_identical_files_and_another_seed_differs(
    bundle: Path, tmp_path: Path
) -> None:
    again = build_tiny_svd(tmp_path / "again", seed=0)
    files = sorted(path.relative_to(bundle) for path in bundle.rglob("*") if path.is_file())

    assert files == sorted(path.relative_to(again) for path in again.rglob("*") if path.is_file())
    for path in files:
        assert (again / path).read_bytes() == (bundle / path).read_bytes(), path

    reseeded = build_tiny_svd(again, seed=1)  # rebuilding over a tiny bundle is allowed

    old, new = load_file(bundle / UNET_WEIGHTS), load_file(reseeded / UNET_WEIGHTS)
    assert not torch.equal(old["conv_in.weight"], new["conv_in.weight"])


def test_building_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    build_tiny_svd(tmp_path / "svd", seed=0)

    assert torch.equal(torch.rand(3), expected)
