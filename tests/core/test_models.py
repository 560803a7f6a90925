"""The tiny bundle, model fingerprints and the component loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from reelflow.core import models
from reelflow.core.models import clear_model_cache, fingerprint_model, load_component, torch_dtype
from reelflow.core.tiny import build_tiny_bundle
from reelflow.schemas.errors import ModelError

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny") / "sd", seed=0)


@pytest.fixture(autouse=True)
def empty_cache():
    clear_model_cache()
    yield
    clear_model_cache()


def test_bundle_loads_as_a_stable_diffusion_pipeline(bundle: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(bundle)

    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.steps_offset == 1
    assert not pipe.scheduler.config.set_alpha_to_one


def test_unet_has_self_and_cross_attention_at_every_level(bundle: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(bundle, subfolder="unet")
    names = unet.attn_processors.keys()

    for kind in ("attn1", "attn2"):
        levels = {name.split(".")[0] for name in names if f".{kind}." in name}
        assert levels == {"down_blocks", "mid_block", "up_blocks"}, kind


@pytest.mark.parametrize(
    ("component", "cls"),
    [
        ("vae", AutoencoderKL),
        ("unet", UNet2DConditionModel),
        ("text_encoder", CLIPTextModel),
        ("tokenizer", CLIPTokenizer),
        ("scheduler", DDIMScheduler),
    ],
)
def test_load_component_returns_the_component(bundle: Path, component: str, cls: type) -> None:
    loaded = load_component(str(bundle), component)

    assert isinstance(loaded, cls)
    if isinstance(loaded, torch.nn.Module):
        assert not loaded.training
        assert not any(p.requires_grad for p in loaded.parameters())
        assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_load_component_casts_to_the_dtype(bundle: Path) -> None:
    unet = load_component(str(bundle), "unet", dtype="bfloat16")

    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}


def test_tokenizer_gives_bos_words_eos_then_padding(bundle: Path) -> None:
    tokenizer = load_component(str(bundle), "tokenizer")

    ids = tokenizer("a cat walking", padding="max_length", max_length=77).input_ids

    assert len(ids) == tokenizer.model_max_length == 77
    assert tokenizer.convert_ids_to_tokens(ids[:5]) == [
        "<|startoftext|>",
        "a</w>",
        "cat</w>",
        "walking</w>",
        "<|endoftext|>",
    ]
    assert ids[5:] == [tokenizer.pad_token_id] * 72


def test_vocab_and_merges_files_tokenise_like_tokenizer_json(bundle: Path) -> None:
    # Readers older than transformers 5 build the tokenizer from vocab.json and merges.txt alone.
    from_files = CLIPTokenizer(
        vocab=str(bundle / "tokenizer/vocab.json"), merges=str(bundle / "tokenizer/merges.txt")
    )
    tokenizer = CLIPTokenizer.from_pretrained(bundle, subfolder="tokenizer")
    prompt = "A man riding a bicycle down a snowy street, in van Gogh's style (1889)"

    assert from_files(prompt).input_ids == tokenizer(prompt).input_ids


def test_same_seed_rebuilds_identical_files_and_another_seed_differs(
    bundle: Path, tmp_path: Path
) -> None:
    again = build_tiny_bundle(tmp_path / "again", seed=0)

    assert fingerprint_model(str(again)) == fingerprint_model(str(bundle))
    for path in bundle.rglob("*"):
        if path.is_file():
            assert (again / path.relative_to(bundle)).read_bytes() == path.read_bytes(), path

    reseeded = build_tiny_bundle(again, seed=1)  # rebuilding over a tiny bundle is allowed

    assert fingerprint_model(str(reseeded)) != fingerprint_model(str(bundle))
    old, new = load_file(bundle / UNET_WEIGHTS), load_file(reseeded / UNET_WEIGHTS)
    assert not torch.equal(old["conv_in.weight"], new["conv_in.weight"])


def test_build_refuses_a_directory_that_is_not_a_tiny_bundle(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")

    with pytest.raises(ModelError, match="not a tiny bundle"):
        build_tiny_bundle(tmp_path)

    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_fingerprint_depends_on_content_not_location(bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    before = fingerprint_model(str(copy))
    (copy / ".cache").mkdir()
    (copy / ".cache" / "download.json").write_text("{}")
    (copy / "README.md").write_text("edited")

    assert before == fingerprint_model(str(bundle))
    assert fingerprint_model(str(copy)) == before
    assert before.startswith("local:") and len(before) == len("local:") + 16


def test_fingerprint_changes_when_a_config_value_changes(bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    config_path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["steps_offset"] = 0
    config_path.write_text(json.dumps(config))

    assert fingerprint_model(str(copy)) != fingerprint_model(str(bundle))


def test_fingerprint_changes_when_the_weights_change(bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    weights = copy / UNET_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    weights.write_bytes(bytes(data))

    assert fingerprint_model(str(copy)) != fingerprint_model(str(bundle))


def test_fingerprint_of_a_hub_id_names_the_commit_not_the_branch(tmp_path: Path) -> None:
    # A commit pins the content by itself: no cache needed. A branch must resolve to one
    # (tests/core/test_model_families.py), so "main" is never part of a fingerprint.
    commit = "0123456789abcdef0123456789abcdef01234567"

    assert fingerprint_model("org/model", revision=commit, cache_dir=str(tmp_path)) == (
        f"hub:org/model@{commit}"
    )
    with pytest.raises(ModelError, match="cannot resolve revision 'main'"):
        fingerprint_model("org/model", cache_dir=str(tmp_path))


@pytest.mark.parametrize("model_id", ["/no/such/model/dir", "../up/and/away", "a/b/c", ""])
def test_fingerprint_rejects_what_is_neither_a_directory_nor_a_hub_id(model_id: str) -> None:
    with pytest.raises(ModelError, match="reelflow models tiny") as info:
        fingerprint_model(model_id)

    assert repr(model_id) in str(info.value)


def test_fingerprint_rejects_a_directory_without_model_files(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("nothing here")

    with pytest.raises(ModelError, match="no config or weight files"):
        fingerprint_model(str(tmp_path))


def test_cache_shares_one_instance_per_key(bundle: Path) -> None:
    vae = load_component(str(bundle), "vae")

    assert load_component(str(bundle), "vae", device="cpu") is vae
    assert load_component(str(bundle), "vae", dtype="bfloat16") is not vae
    assert load_component(str(bundle), "unet") is not vae


def test_cache_reloads_a_bundle_rebuilt_in_place(tmp_path: Path) -> None:
    path = build_tiny_bundle(tmp_path / "sd", seed=0)
    before = load_component(str(path), "vae")

    build_tiny_bundle(path, seed=1)
    after = load_component(str(path), "vae")

    assert after is not before
    assert not torch.equal(after.encoder.conv_in.weight, before.encoder.conv_in.weight)


def test_cache_evicts_the_least_recently_used(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "CACHE_SIZE", 2)
    first = load_component(str(bundle), "vae", dtype="float32")
    second = load_component(str(bundle), "vae", dtype="float16")
    assert load_component(str(bundle), "vae", dtype="float32") is first  # now most recent

    load_component(str(bundle), "vae", dtype="bfloat16")

    assert load_component(str(bundle), "vae", dtype="float32") is first
    assert load_component(str(bundle), "vae", dtype="float16") is not second


def test_scheduler_is_fresh_per_call_because_set_timesteps_mutates_it(bundle: Path) -> None:
    scheduler = load_component(str(bundle), "scheduler")
    scheduler.set_timesteps(5)

    other = load_component(str(bundle), "scheduler")

    assert other is not scheduler
    assert other.num_inference_steps is None
    assert other.config == scheduler.config


def test_a_tokenizer_is_a_copy_per_call_because_each_call_sets_its_padding(bundle: Path) -> None:
    tokenizer = load_component(str(bundle), "tokenizer")
    tokenizer(["a cat", "a cat walking on a street"], padding="max_length", max_length=16, truncation=True)
    other = load_component(str(bundle), "tokenizer")  # another stage, at the same time

    assert other is not tokenizer
    assert tokenizer._tokenizer.padding is not None and other._tokenizer.padding is None, "its own padding state"
    assert other("a cat").input_ids == tokenizer("a cat").input_ids


def test_unknown_component_lists_the_valid_ones(bundle: Path) -> None:
    with pytest.raises(ModelError, match="unknown model component 'safety_checker'") as info:
        load_component(str(bundle), "safety_checker")

    assert isinstance(info.value, ValueError)
    for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert name in str(info.value)


def test_missing_local_path_says_how_to_fix_it() -> None:
    with pytest.raises(ModelError, match="HF_HOME") as info:
        load_component("/no/such/model/dir", "vae")

    assert "'/no/such/model/dir'" in str(info.value)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_uncached_hub_id_while_offline_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="reelflow models tiny") as info:
        load_component("nobody/no-such-model", "unet", cache_dir=str(tmp_path))

    assert "'nobody/no-such-model'" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


def test_bundle_missing_a_component_is_a_model_error(bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    shutil.rmtree(copy / "vae")

    with pytest.raises(ModelError, match="cannot load 'vae'.*with a vae/ folder"):
        load_component(str(copy), "vae")


def test_torch_dtype_names() -> None:
    assert torch_dtype("float16") is torch.float16
    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ModelError, match="float32, float16, bfloat16"):
        torch_dtype("fp16")
    with pytest.raises(ModelError, match="valid"):
        load_component("org/model", "vae", dtype="half")
