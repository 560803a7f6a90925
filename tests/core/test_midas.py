"""MiDaS DPT depth models: the official checkpoint layout, strict loading, the midas family, tiny builders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from reelflow.core.depth.midas import (
    ARCHITECTURES,
    MidasDPT,
    load_midas_state_dict,
    midas_state_dict,
    resolve_architecture,
)
from reelflow.core.models import clear_model_cache, fingerprint_model, infer_family, load_model
from reelflow.core.tiny import MARKER
from reelflow.core.tiny_depth import (
    BEIT_ARCHITECTURE,
    TINY_MIDAS_ARGS,
    VIT_ARCHITECTURE,
    build_tiny_midas,
    build_tiny_midas_beit,
    tiny_midas,
)
from reelflow.schemas.errors import ModelError

LAYOUTS = {
    "vit": (VIT_ARCHITECTURE, build_tiny_midas, "model.pt"),
    "beit": (BEIT_ARCHITECTURE, build_tiny_midas_beit, "model.safetensors"),
}
# Every top-level group of keys in isl-org/MiDaS's DPTDepthModel state dicts.
OFFICIAL_PREFIXES = (
    "pretrained.model.",
    *(f"pretrained.act_postprocess{i}." for i in range(1, 5)),
    *(f"scratch.layer{i}_rn." for i in range(1, 5)),
    *(f"scratch.refinenet{i}." for i in range(1, 5)),
    "scratch.output_conv.",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("midas")
    return {kind: build(root / kind, seed=0) for kind, (_, build, _) in LAYOUTS.items()}


@pytest.fixture(autouse=True)
def empty_cache():
    clear_model_cache()
    yield
    clear_model_cache()


def _pixels(height: int = 64, width: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))


def _saved(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_state_dict_round_trips_with_every_key_used(kind: str, built: dict[str, Path]) -> None:
    architecture, _, weights = LAYOUTS[kind]
    saved = _saved(built[kind] / weights)
    assert saved.keys() == midas_state_dict(tiny_midas(0, architecture)).keys()
    other = tiny_midas(1, architecture)  # different weights, so loading has to overwrite every one
    assert not torch.equal(other(_pixels()), tiny_midas(0, architecture)(_pixels()))
    load_midas_state_dict(other, saved)
    for key, value in midas_state_dict(other).items():
        assert torch.equal(value, saved[key]), key
    assert torch.equal(other(_pixels()), tiny_midas(0, architecture)(_pixels()))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_keys_follow_the_official_layout(kind: str) -> None:
    keys = set(midas_state_dict(tiny_midas(0, LAYOUTS[kind][0])))
    for prefix in OFFICIAL_PREFIXES:
        assert any(k.startswith(prefix) for k in keys), prefix
    assert all(k.startswith(OFFICIAL_PREFIXES) for k in keys)
    # Reassemble: readout projection at 0, 1x1 at 3, resampling at 4 except for stage 3.
    for i in range(1, 5):
        assert {f"pretrained.act_postprocess{i}.0.project.0.weight", f"pretrained.act_postprocess{i}.3.weight"} <= keys
        assert (f"pretrained.act_postprocess{i}.4.weight" in keys) == (i != 3)
    # refinenet4 has a skip unit it never uses, and the checkpoints carry it.
    assert "scratch.refinenet4.resConfUnit1.conv1.weight" in keys
    assert {"scratch.refinenet1.out_conv.bias", "scratch.layer1_rn.weight"} <= keys
    assert "scratch.layer1_rn.bias" not in keys
    assert {k for k in keys if k.startswith("scratch.output_conv.")} == {
        f"scratch.output_conv.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")
    }
    if kind == "beit":
        assert {
            "pretrained.model.blocks.0.attn.relative_position_index",
            "pretrained.model.blocks.0.attn.relative_position_bias_table",
            "pretrained.model.blocks.0.gamma_1",
            "pretrained.model.blocks.0.attn.q_bias",
            "pretrained.model.fc_norm.weight",
        } <= keys
    else:
        assert {
            "pretrained.model.pos_embed",
            "pretrained.model.blocks.0.attn.qkv.bias",
            "pretrained.model.norm.weight",
        } <= keys


@pytest.mark.parametrize(
    ("architecture", "keys", "millions"),
    # Parameter counts as the MiDaS README lists them; keys as isl-org/MiDaS's DPTDepthModel has them
    # (BEiT's count includes its 24 saved relative_position_index buffers).
    [("dpt_large_384", 368, 344), ("dpt_beit_large_512", 487, 345), ("dpt_beit_base_384", 283, 112)],
)
def test_full_size_layouts_match_the_published_models(architecture: str, keys: int, millions: int) -> None:
    with torch.device("meta"):
        model = MidasDPT(architecture)
    assert len(midas_state_dict(model)) == keys
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions


@pytest.mark.parametrize("kind", LAYOUTS)
def test_loads_through_the_family(kind: str, built: dict[str, Path]) -> None:
    architecture = LAYOUTS[kind][0]
    model = load_model(str(built[kind]), family="midas")
    assert isinstance(model, MidasDPT) and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    depth = model(_pixels())
    assert depth.shape == (2, 64, 64)
    assert (depth >= 0).all() and depth.std() > 0
    assert torch.equal(depth, tiny_midas(0, architecture)(_pixels()))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_the_family_is_inferred_and_fingerprints_the_weights(kind: str, built: dict[str, Path], tmp_path: Path) -> None:
    assert infer_family(str(built[kind])) == "midas"
    copy = Path(shutil.copytree(built[kind], tmp_path / kind))
    assert fingerprint_model(str(copy)) == fingerprint_model(str(built[kind]))
    weights = copy / LAYOUTS[kind][2]
    data = bytearray(weights.read_bytes())
    data[-100] ^= 1
    weights.write_bytes(bytes(data))
    assert fingerprint_model(str(copy)) != fingerprint_model(str(built[kind]))


def test_a_published_checkpoint_alone_is_recognised_by_its_name(tmp_path: Path, built: dict[str, Path]) -> None:
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(built["vit"] / "model.pt", alone / "dpt_beit_large_512.pt")
    assert infer_family(str(alone)) == "midas"
    (alone / "dpt_beit_large_512.pt").rename(alone / "weights.pt")
    assert infer_family(str(alone)) is None
    torchvision = tmp_path / "torchvision"
    torchvision.mkdir()
    (torchvision / "config.json").write_text(json.dumps({"library": "torchvision", "architecture": "raft_small"}))
    shutil.copy(built["vit"] / "model.pt", torchvision / "dpt_large_384.pt")
    assert infer_family(str(torchvision)) == "torchvision"


def test_the_pt_checkpoint_is_read_weights_only(built: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    real_load, calls = torch.load, []

    def spy(*args: Any, **kwargs: Any) -> Any:
        assert kwargs.get("weights_only") is True, kwargs
        calls.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model(str(built["vit"]), family="midas")
    assert [Path(p).name for p in calls] == ["model.pt"]


class _Payload:
    """Anything that is not a tensor or a plain container; unpickling it would run code."""


def test_a_pt_that_holds_more_than_tensors_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(built["vit"], tmp_path / "vit"))
    torch.save({"scratch.output_conv.4.bias": _Payload()}, model_dir / "model.pt")
    with pytest.raises(ModelError, match="holds more than tensors"):
        load_model(str(model_dir), family="midas")


def test_a_checkpoint_saved_with_its_optimizer_gives_its_model(built: dict[str, Path], tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(built["vit"], tmp_path / "vit"))
    weights = torch.load(model_dir / "model.pt", weights_only=True)
    torch.save({"model": weights, "optimizer": {"state": {}}}, model_dir / "model.pt")
    assert torch.equal(load_model(str(model_dir), family="midas")(_pixels()), tiny_midas(0)(_pixels()))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_a_missing_or_extra_key_is_refused_by_name(kind: str) -> None:
    architecture = LAYOUTS[kind][0]
    weights = midas_state_dict(tiny_midas(0, architecture))
    model = tiny_midas(1, architecture)
    lacking = {k: v for k, v in weights.items() if k != "scratch.refinenet4.resConfUnit1.conv1.weight"}
    with pytest.raises(ModelError, match=r"missing scratch\.refinenet4\.resConfUnit1\.conv1\.weight; unexpected none"):
        load_midas_state_dict(model, lacking)
    with pytest.raises(ModelError, match=r"missing none; unexpected pretrained\.model\.mask_token"):
        load_midas_state_dict(model, {**weights, "pretrained.model.mask_token": torch.zeros(1, 1, 32)})
    resized = {**weights, "scratch.layer1_rn.weight": torch.zeros(16, 8, 1, 1)}
    with pytest.raises(ModelError, match=r"wrong shapes: scratch\.layer1_rn\.weight \(16, 8, 1, 1\)"):
        load_midas_state_dict(model, resized)
    # Nothing was half-loaded on the way.
    assert not torch.equal(model(_pixels()), tiny_midas(0, architecture)(_pixels()))


def test_beit_relative_position_index_is_optional_but_checked() -> None:
    weights = midas_state_dict(tiny_midas(0, BEIT_ARCHITECTURE))
    key = "pretrained.model.blocks.2.attn.relative_position_index"
    model = tiny_midas(1, BEIT_ARCHITECTURE)
    load_midas_state_dict(model, {k: v for k, v in weights.items() if "relative_position_index" not in k})
    assert torch.equal(model(_pixels()), tiny_midas(0, BEIT_ARCHITECTURE)(_pixels()))
    with pytest.raises(ModelError, match=rf"{key} in the checkpoint differs"):
        load_midas_state_dict(model, {**weights, key: weights[key].flip(0)})


@pytest.mark.parametrize("kind", LAYOUTS)
def test_rebuilds_are_byte_identical_per_seed(kind: str, built: dict[str, Path], tmp_path: Path) -> None:
    build, weights = LAYOUTS[kind][1], LAYOUTS[kind][2]
    again = build(tmp_path / "again", seed=0)
    other = build(tmp_path / "other", seed=1)
    names = sorted(p.name for p in built[kind].iterdir())
    assert names == sorted(p.name for p in again.iterdir()) == ["README.md", "config.json", weights]
    for name in names:
        assert (again / name).read_bytes() == (built[kind] / name).read_bytes(), name
    assert (other / weights).read_bytes() != (built[kind] / weights).read_bytes()
    assert MARKER in (built[kind] / "README.md").read_text()
    config = json.loads((built[kind] / "config.json").read_text())
    assert config == {"library": "midas", "architecture": LAYOUTS[kind][0], "model_args": TINY_MIDAS_ARGS}


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Random parameters everywhere, so layer scales, biases and position tables all matter."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def _hooked_timm_outputs(backbone: torch.nn.Module, pixels: torch.Tensor, hooks: list[int]) -> list[torch.Tensor]:
    taken: dict[int, torch.Tensor] = {}
    handles = [
        backbone.blocks[i].register_forward_hook(lambda _m, _i, out, i=i: taken.__setitem__(i, out)) for i in hooks
    ]
    try:
        backbone.forward_features(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return [taken[i] for i in hooks]


@pytest.mark.parametrize("kind", LAYOUTS)
def test_hooked_tokens_equal_timms_own_forward_at_the_native_size(kind: str) -> None:
    from reelflow.core.depth.midas import _TOKEN_PASSES

    model = _randomised(tiny_midas(0, LAYOUTS[kind][0]))
    backbone, hooks, pixels = model.pretrained.model, TINY_MIDAS_ARGS["hooks"], _pixels()
    ours = _TOKEN_PASSES[kind](backbone, pixels, (4, 4), tuple(hooks))
    theirs = _hooked_timm_outputs(backbone, pixels, hooks)
    for mine, stock in zip(ours, theirs):
        torch.testing.assert_close(mine, stock, rtol=1e-5, atol=1e-5)


def test_beit_bias_at_the_native_grid_is_timms() -> None:
    from timm.models.beit import gen_relative_position_index

    from reelflow.core.depth.midas import _relative_position_bias

    attn = _randomised(tiny_midas(0, BEIT_ARCHITECTURE)).pretrained.model.blocks[1].attn
    bias = _relative_position_bias(attn, (4, 4), gen_relative_position_index((4, 4)))
    assert torch.equal(bias, attn._get_rel_pos_bias())
    # Resized for another grid, the class-token rows are kept and the shape follows the grid.
    wide = _relative_position_bias(attn, (3, 5), gen_relative_position_index((3, 5)))
    assert wide.shape == (1, 2, 16, 16)
    assert torch.equal(wide[0, :, 0, 0], attn.relative_position_bias_table[-1])


@pytest.mark.parametrize("kind", LAYOUTS)
def test_other_input_sizes_give_depth_at_that_size(kind: str) -> None:
    model = tiny_midas(0, LAYOUTS[kind][0])
    depth = model(_pixels(48, 80, batch=1))
    assert depth.shape == (1, 48, 80) and (depth >= 0).all()
    with pytest.raises(ValueError, match="not a multiple of the patch size 16x16"):
        model(_pixels(50, 64))


def test_architectures_and_overrides_are_checked() -> None:
    assert set(ARCHITECTURES) >= {"dpt_large_384", "dpt_beit_large_512"}
    large = resolve_architecture("dpt_beit_large_512")
    assert (large.backbone, large.input_size, large.hooks) == ("beit_large_patch16_512", 512, (5, 11, 17, 23))
    assert large.mean == large.std == (0.5, 0.5, 0.5)
    with pytest.raises(ModelError, match="unknown MiDaS architecture 'dpt_hybrid_384'; valid: dpt_large_384"):
        MidasDPT("dpt_hybrid_384")
    with pytest.raises(ModelError, match=r"unknown MiDaS model_args \['depth'\]"):
        MidasDPT(VIT_ARCHITECTURE, {**TINY_MIDAS_ARGS, "depth": 4})
    with pytest.raises(ModelError, match="four increasing hooks below its depth 4"):
        MidasDPT(VIT_ARCHITECTURE, {**TINY_MIDAS_ARGS, "hooks": [0, 1, 2, 4]})
