"""The guided_diffusion family: released ADM checkpoints renamed onto diffusers' UNet2DModel compute what
guided-diffusion's own UNetModel computes.

The reference here is a direct transcription of guided-diffusion's ``UNetModel.forward`` (unet.py: ResBlock
with scale-shift norm and resampling, AttentionBlock with the legacy and the new q/k/v order,
``timestep_embedding``) as functions over the checkpoint's own keys, independent of the renaming under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from reelflow.core.models import infer_family
from reelflow.core.models.base import ModelSource
from reelflow.core.models.guided_diffusion_family import (
    GuidedDiffusionFamily,
    adm_config,
    convert,
    layout,
    unet_config,
)
from reelflow.core.tiny_adm import TINY_FLAGS, build_tiny_adm
from reelflow.schemas.errors import ModelError


def _gn(w, name, x):
    return F.group_norm(x.float(), 32, w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-5)


def _res(w, name, x, emb, updown=None):
    h = F.silu(_gn(w, f"{name}.in_layers.0", x))
    if updown == "down":
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    elif updown == "up":
        h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
    h = F.conv2d(h, w[f"{name}.in_layers.2.weight"], w[f"{name}.in_layers.2.bias"], padding=1)
    scale, shift = F.linear(F.silu(emb), w[f"{name}.emb_layers.1.weight"], w[f"{name}.emb_layers.1.bias"])[..., None, None].chunk(2, 1)
    h = _gn(w, f"{name}.out_layers.0", h) * (1 + scale) + shift
    h = F.conv2d(F.silu(h), w[f"{name}.out_layers.3.weight"], w[f"{name}.out_layers.3.bias"], padding=1)
    skip = f"{name}.skip_connection.weight"
    return (F.conv2d(x, w[skip], w[f"{name}.skip_connection.bias"]) if skip in w else x) + h


def _attn(w, name, x, head_channels, new_order):
    b, c, hh, ww = x.shape
    flat = x.reshape(b, c, -1)
    qkv = F.conv1d(_gn(w, f"{name}.norm", flat), w[f"{name}.qkv.weight"], w[f"{name}.qkv.bias"])
    heads, length = c // head_channels, flat.shape[-1]
    if new_order:
        q, k, v = (part.reshape(b * heads, head_channels, length) for part in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * head_channels, length).split(head_channels, dim=1)
    scale = 1 / math.sqrt(math.sqrt(head_channels))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, length)
    h = F.conv1d(a, w[f"{name}.proj_out.weight"], w[f"{name}.proj_out.bias"])
    return (flat + h).reshape(b, c, hh, ww)


def _guided_diffusion_forward(w, flags, x, t):
    channels, res_blocks = flags["num_channels"], flags["num_res_blocks"]
    mult = [int(m) for m in flags["channel_mult"].split(",")]
    attention = {flags["image_size"] // int(r) for r in flags["attention_resolutions"].split(",")}
    head, new_order = flags["num_head_channels"], flags.get("use_new_attention_order", False)
    half = channels // 2
    args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.silu(F.linear(emb, w["time_embed.0.weight"], w["time_embed.0.bias"]))
    emb = F.linear(emb, w["time_embed.2.weight"], w["time_embed.2.bias"])
    h = F.conv2d(x, w["input_blocks.0.0.weight"], w["input_blocks.0.0.bias"], padding=1)
    hs, block, ds = [h], 1, 1
    for level in range(len(mult)):
        for _ in range(res_blocks):
            h = _res(w, f"input_blocks.{block}.0", h, emb)
            if ds in attention:
                h = _attn(w, f"input_blocks.{block}.1", h, head, new_order)
            hs.append(h)
            block += 1
        if level != len(mult) - 1:
            h = _res(w, f"input_blocks.{block}.0", h, emb, "down")
            hs.append(h)
            block, ds = block + 1, ds * 2
    h = _res(w, "middle_block.2", _attn(w, "middle_block.1", _res(w, "middle_block.0", h, emb), head, new_order), emb)
    block = 0
    for level in reversed(range(len(mult))):
        for i in range(res_blocks + 1):
            h = _res(w, f"output_blocks.{block}.0", torch.cat([h, hs.pop()], dim=1), emb)
            index = 1
            if ds in attention:
                h, index = _attn(w, f"output_blocks.{block}.1", h, head, new_order), 2
            if level and i == res_blocks:
                h, ds = _res(w, f"output_blocks.{block}.{index}", h, emb, "up"), ds // 2
            block += 1
    return F.conv2d(F.silu(_gn(w, "out.0", h)), w["out.2.weight"], w["out.2.bias"], padding=1)


def _random_checkpoint(flags, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, _, shape in layout(adm_config(flags)):
        scale = 0.05 if len(shape) == 1 else 1 / math.sqrt(math.prod(shape[1:]))
        out[name] = torch.randn(shape, generator=generator) * scale + (1.0 if name.endswith("norm.weight") else 0.0)
    return out


@pytest.mark.parametrize("new_order", [False, True])
def test_renamed_checkpoint_computes_what_guided_diffusion_computes(new_order: bool) -> None:
    flags = {**TINY_FLAGS, "channel_mult": "1,2,2", "num_res_blocks": 2, "attention_resolutions": "32,16",
             "use_new_attention_order": new_order}  # fmt: skip
    weights = _random_checkpoint(flags)
    unet = UNet2DModel(**unet_config(adm_config(flags)))
    unet.load_state_dict(convert(weights, adm_config(flags)), strict=True)
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 870])
    with torch.no_grad():
        ours, reference = unet(x, t).sample, _guided_diffusion_forward(weights, flags, x, t)
    assert ours.shape == (2, 6, 32, 32)
    torch.testing.assert_close(ours, reference, atol=2e-4, rtol=1e-4)


def test_the_released_256_model_fits_unet2dmodel_key_for_key() -> None:
    adm = adm_config({"library": "guided_diffusion"})  # the defaults: 256x256_diffusion_uncond.pt
    with torch.device("meta"):
        unet = UNet2DModel(**unet_config(adm))
        converted = convert({old: torch.empty(shape) for old, _, shape in layout(adm)}, adm)
    expected = unet.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert adm.widths == (256, 256, 512, 512, 1024, 1024) and adm.attention_ds == {8, 16, 32} and adm.out_channels == 6
    assert [t for t in unet.config.down_block_types].count("AttnDownBlock2D") == 3


def test_the_tiny_model_loads_through_its_family(tmp_path) -> None:
    root = build_tiny_adm(tmp_path / "adm")
    assert infer_family(root) == "guided_diffusion"
    family = GuidedDiffusionFamily()
    unet = family.load(ModelSource("tiny", path=root))
    weights = torch.load(root / "tiny_diffusion_uncond.pt", weights_only=True)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t).sample, _guided_diffusion_forward(weights, TINY_FLAGS, x, t), atol=2e-4, rtol=1e-4)
    scheduler = family.load(ModelSource("tiny", path=root), component="scheduler")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-6, rtol=1e-5)
    assert float(scheduler.final_alpha_cumprod) == 1.0
    assert build_tiny_adm(tmp_path / "again").joinpath("tiny_diffusion_uncond.pt").read_bytes() == (
        root / "tiny_diffusion_uncond.pt").read_bytes()  # fmt: skip


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"num_channels": 64}, r"time_embed.0.weight is \(128, 32\), the flags in config.json give \(256, 64\)"),
        ({"class_cond": True}, "class-conditional"),
        ({"learn_sigma": False}, r"out.2.weight is \(6, 32, 3, 3\), the flags in config.json give \(3, 32, 3, 3\)"),
        ({"num_head_chanels": 16}, "flags guided-diffusion does not know: num_head_chanels"),
        ({"channel_mult": "2,2"}, r"channel_mult \(2, 2\) starts at 2; only models whose first level is num_channels wide"),
        ({"predict_xstart": True}, "predict_xstart=True: Soundini's guidance takes a model that predicts the noise"),
    ],
)
def test_wrong_flags_are_refused_with_the_fix(tmp_path, config, message) -> None:
    root = build_tiny_adm(tmp_path / "adm")
    (root / "config.json").write_text(json.dumps({**TINY_FLAGS, **config}))
    with pytest.raises(ModelError, match=message):
        GuidedDiffusionFamily().load(ModelSource("tiny", path=root))


def test_a_missing_config_names_the_file_to_write(tmp_path) -> None:
    root = build_tiny_adm(tmp_path / "adm")
    (root / "config.json").unlink()
    with pytest.raises(ModelError, match=r'no config.json .*\{"library": "guided_diffusion"\}'):
        GuidedDiffusionFamily().load(ModelSource("tiny", path=root))


def test_the_sampler_flags_of_guided_diffusion_are_accepted_beside_the_model_flags(tmp_path) -> None:
    root = build_tiny_adm(tmp_path / "adm")
    diffusion_flags = {"timestep_respacing": "100", "use_kl": False, "rescale_timesteps": True, "predict_xstart": False}
    (root / "config.json").write_text(json.dumps({**TINY_FLAGS, **diffusion_flags}))
    assert isinstance(GuidedDiffusionFamily().load(ModelSource("tiny", path=root)), UNet2DModel)
