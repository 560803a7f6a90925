"""IP-Adapter on a shared UNet: read as its authors publish it, installed exactly as diffusers installs it, and
taken off again; refused when it does not fit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from safetensors.torch import load_file, save_file

from reelflow.core.attention.ip_adapter import image_embed_kwargs, ip_adapter
from reelflow.core.attention.processor import FrameAttnProcessor, install_frame_processors
from reelflow.core.models import infer_family, load_model
from reelflow.core.models.ip_adapter_family import read_adapter
from reelflow.core.tiny import tiny_unet
from reelflow.core.tiny_gen1 import IP_ADAPTER_WEIGHTS, build_tiny_ip_adapter
from reelflow.schemas.errors import ModelError


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ip_adapter(tmp_path_factory.mktemp("ip") / "ip-adapter")


def load(adapter_dir: Path, component: str | None = None):
    return load_model(str(adapter_dir), family="ip_adapter", component=component, weight_name=IP_ADAPTER_WEIGHTS)


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator), torch.randn(2, 1, 32, generator=generator)


def test_the_adapter_acts_as_diffusers_loads_it_and_comes_off_again(adapter_dir: Path) -> None:
    torch.manual_seed(0)
    ours, theirs = tiny_unet(), tiny_unet()
    theirs.load_state_dict(ours.state_dict())
    state = load_file(adapter_dir / IP_ADAPTER_WEIGHTS)
    split = {part: {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")} for part in ("image_proj", "ip_adapter")}
    theirs._load_ip_adapter_weights([split])  # what StableDiffusionPipeline.load_ip_adapter does to its UNet
    for processor in theirs.attn_processors.values():
        if isinstance(processor, IPAdapterAttnProcessor2_0):
            processor.scale = [0.6]
    z, text, image = inputs()
    before = ours(z, 10, encoder_hidden_states=text).sample
    with ip_adapter(ours, load(adapter_dir), scale=0.6):
        adapted = ours(z, 10, encoder_hidden_states=text, **image_embed_kwargs(ours, image)).sample
    expected = theirs(z, 10, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [image]}).sample
    torch.testing.assert_close(adapted, expected, rtol=0, atol=0)
    assert (adapted - before).abs().max() > 1e-2  # the image tokens reach the UNet
    assert ours.encoder_hid_proj is None and ours.config.encoder_hid_dim_type is None
    assert not any(isinstance(p, IPAdapterAttnProcessor2_0) for p in ours.attn_processors.values())
    torch.testing.assert_close(ours(z, 10, encoder_hidden_states=text).sample, before, rtol=0, atol=0)


def test_cross_frame_self_attention_goes_on_beside_the_adapter(adapter_dir: Path) -> None:
    unet = tiny_unet()
    with ip_adapter(unet, load(adapter_dir)):
        install_frame_processors(unet, frame_keys=("self", "first"), cross_attention=False)
        kinds = {name.rsplit(".", 2)[-2]: type(p) for name, p in unet.attn_processors.items()}
    assert kinds == {"attn1": FrameAttnProcessor, "attn2": IPAdapterAttnProcessor2_0}


def test_the_family_reads_the_published_layout(adapter_dir: Path) -> None:
    assert infer_family(str(adapter_dir)) == "ip_adapter"
    weights = load(adapter_dir)
    assert (weights.num_tokens, weights.cross_attention_dim, weights.image_embed_dim, len(weights.layers)) == (4, 32, 32, 4)
    encoder, processor = load(adapter_dir, "image_encoder"), load(adapter_dir, "feature_extractor")
    assert encoder.config.projection_dim == 32
    assert processor.crop_size["height"] == encoder.config.image_size  # CLIP's defaults at the encoder's size


def test_a_model_that_reads_one_file_needs_its_name_and_others_take_none(adapter_dir: Path, tiny_bundle: Path) -> None:
    with pytest.raises(ModelError, match="models of family ip_adapter name the file to read with `models.<name>.weight_name`"):
        load_model(str(adapter_dir), family="ip_adapter")
    with pytest.raises(ModelError, match="models of family diffusers are read whole"):
        load_model(str(tiny_bundle), family="diffusers", component="unet", weight_name=IP_ADAPTER_WEIGHTS)


def test_plus_adapters_pickles_and_damaged_files_are_refused(adapter_dir: Path, tmp_path: Path) -> None:
    state = load_file(adapter_dir / IP_ADAPTER_WEIGHTS)
    plus = {k: v for k, v in state.items() if not k.startswith("image_proj.")} | {"image_proj.latents": torch.zeros(1, 16, 32)}
    save_file(plus, tmp_path / "ip-adapter-plus_sd15.safetensors")
    with pytest.raises(ModelError, match="Plus or Face adapter"):
        read_adapter(tmp_path / "ip-adapter-plus_sd15.safetensors")
    save_file({k: v for k, v in state.items() if k != "ip_adapter.3.to_v_ip.weight"}, tmp_path / "damaged.safetensors")
    with pytest.raises(ModelError, match="lacks '3.to_v_ip.weight'"):
        read_adapter(tmp_path / "damaged.safetensors")
    with pytest.raises(ModelError, match="safetensors only"):
        read_adapter(tmp_path / "ip-adapter_sd15.bin")
    save_file({**state, "image_proj.norm.weight": torch.ones(48)}, tmp_path / "misshapen.safetensors")
    with pytest.raises(ModelError, match=r"inconsistent shapes \(norm.weight\) for 32-wide cross-attention"):
        read_adapter(tmp_path / "misshapen.safetensors")


def test_an_adapter_for_another_unet_is_refused(adapter_dir: Path) -> None:
    weights = load(adapter_dir)
    fewer = dataclasses.replace(weights, layers=weights.layers[:-1])
    with pytest.raises(ModelError, match="3 cross-attention layers but the UNet has 4"):
        with ip_adapter(tiny_unet(), fewer):
            pass
    wider = dataclasses.replace(weights, layers=[(torch.zeros(k.shape[0], 48), v) for k, v in weights.layers])
    with pytest.raises(ModelError, match="made for another base model; pick the adapter file made for this UNet's"):
        with ip_adapter(tiny_unet(), wider):
            pass


def test_the_unet_is_restored_when_the_block_raises_and_the_adapter_follows_its_dtype(adapter_dir: Path) -> None:
    unet = tiny_unet()
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="stage failed"):
        with ip_adapter(unet, load(adapter_dir)):
            raise RuntimeError("stage failed")
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    assert all(type(p) is type(before[name]) for name, p in unet.attn_processors.items())
    half = unet.to(torch.bfloat16)
    z, text, image = (t.to(torch.bfloat16) for t in inputs())
    with ip_adapter(half, load(adapter_dir)):  # float32 weights on a bfloat16 UNet
        assert half(z, 10, encoder_hidden_states=text, **image_embed_kwargs(half, image)).sample.dtype == torch.bfloat16


def test_image_embeddings_go_with_an_adapter_or_not_at_all(adapter_dir: Path) -> None:
    unet = tiny_unet()
    with pytest.raises(ValueError, match="image embeddings go with an IP-Adapter on the UNet"):
        image_embed_kwargs(unet, torch.zeros(2, 1, 32))
    with ip_adapter(unet, load(adapter_dir)), pytest.raises(ValueError, match="pass both, or neither"):
        image_embed_kwargs(unet, None)
