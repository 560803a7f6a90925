"""The guided_diffusion family: OpenAI's pixel-space ADM UNets (Dhariwal & Nichol 2021, "Diffusion Models
Beat GANs on Image Synthesis"; github.com/openai/guided-diffusion) from their released checkpoints,
such as ``256x256_diffusion_uncond.pt``, the backbone of Soundini's prototype and of Blended Diffusion.

A model is a directory: ``config.json`` ``{"library": "guided_diffusion", ...}`` with the flags the
checkpoint was trained with, under guided-diffusion's own names (``image_size``, ``num_channels``,
``num_res_blocks``, ``channel_mult``, ``attention_resolutions``, ``num_head_channels``,
``learn_sigma``, ``resblock_updown``, ``use_scale_shift_norm``, ``use_new_attention_order``,
``diffusion_steps``, ``noise_schedule``; the defaults are ``256x256_diffusion_uncond.pt``'s, so
``{"library": "guided_diffusion"}`` alone describes it), beside the weights: ``model.safetensors``
or the one ``*.pt`` as released, read with ``torch.load(weights_only=True)``.

Components: the UNet (no component, or ``unet``) is rebuilt as a diffusers ``UNet2DModel`` and the
checkpoint's keys renamed onto it (:func:`convert`); ``scheduler`` is a ``DDIMScheduler`` over the
model's training noise schedule (:func:`scheduler_config`). Every checkpoint key must be used, with
the shape the flags imply, and none be missing. The UNet predicts noise in its first three output
channels (with ``learn_sigma`` the other three are the variance interpolation, which DDIM does not
use). In half precision the whole network runs in it (guided-diffusion keeps its normalisations, timestep
embedding and output layer in float32 under ``use_fp16``).

The one trap in the renaming: ADM's attention computes ``q, k, v`` with one 1x1 convolution whose
output channels are grouped head by head, ``(heads, 3, head_channels)`` ("legacy" order, every
released ADM checkpoint), or ``(3, heads, head_channels)`` with ``use_new_attention_order``; diffusers
holds three separate projections, so the rows are regrouped by that order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch

from reelflow.core.models.base import (
    ModelFamily,
    ModelSource,
    is_state_dict,
    prepare,
    read_checkpoint,
    read_json_file,
    read_root_config,
    torch_dtype,
)
from reelflow.schemas.errors import ModelError

LIBRARY = "guided_diffusion"
SAFE_WEIGHTS, PICKLED_SUFFIX = "model.safetensors", ".pt"
GROUPS = 32  # ADM's GroupNorm32

# The flags of 256x256_diffusion_uncond.pt (guided-diffusion's README), every other flag at its default.
DEFAULT_FLAGS: dict[str, Any] = {
    "image_size": 256,
    "num_channels": 256,
    "num_res_blocks": 2,
    "channel_mult": "",
    "attention_resolutions": "32,16,8",
    "num_heads": 4,
    "num_head_channels": 64,
    "learn_sigma": True,
    "class_cond": False,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "use_new_attention_order": False,
    "dropout": 0.0,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "use_fp16": True,
    "use_checkpoint": False,
    "num_heads_upsample": -1,
}
_DEFAULT_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
# Flags of guided-diffusion's sampler, not its network: a config copied from the README's MODEL_FLAGS and
# DIFFUSION_FLAGS may hold them. Respacing is the DDIM schedule's business here; those that change what the
# model predicts are refused in adm_config.
SAMPLING_FLAGS = {"timestep_respacing": "", "use_kl": False, "predict_xstart": False, "rescale_timesteps": False,
                  "rescale_learned_sigmas": False}  # fmt: skip
_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


@dataclass(frozen=True)
class ADMConfig:
    """The architecture the flags describe."""

    image_size: int
    channels: int
    res_blocks: int
    mult: tuple[int, ...]
    attention_ds: frozenset[int]
    head_channels: int
    out_channels: int
    new_attention_order: bool
    steps: int
    schedule: str

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(int(m * self.channels) for m in self.mult)

    @property
    def downscale(self) -> int:
        """How many times each side of the input must divide: one halving per level but the last."""
        return 2 ** (len(self.mult) - 1)


def adm_config(config: dict[str, Any], where: str = "config.json") -> ADMConfig:
    """The architecture of a ``config.json`` of guided-diffusion flags (defaults: ``256x256_diffusion_uncond``).

    Raises:
        ModelError: An unknown flag, or one this family cannot build (class-conditional models, a head count
            instead of a head width, scale-shift norm or resblock up/down off).
    """
    flags = {k: v for k, v in config.items() if k != "library"}
    unknown = sorted(set(flags) - set(DEFAULT_FLAGS) - set(SAMPLING_FLAGS))
    if unknown:
        raise ModelError(f"{where} has flags guided-diffusion does not know: {', '.join(unknown)}; "
                         f"valid: {', '.join(DEFAULT_FLAGS)}")
    flags = {**DEFAULT_FLAGS, **flags}
    refused = {
        "class_cond": (flags["class_cond"], "class-conditional checkpoints are not supported; use an unconditional one such as 256x256_diffusion_uncond.pt"),
        "use_scale_shift_norm": (not flags["use_scale_shift_norm"], "only ADM's scale-shift norm (use_scale_shift_norm true) is supported"),
        "resblock_updown": (not flags["resblock_updown"], "only resampling residual blocks (resblock_updown true) are supported"),
        "num_head_channels": (int(flags["num_head_channels"]) <= 0, "attention by head count is not supported; give num_head_channels"),
        "predict_xstart": (bool(flags.get("predict_xstart")), "Soundini's guidance takes a model that predicts the noise, not x_0"),
        "rescale_timesteps": (bool(flags.get("rescale_timesteps")) and int(flags["diffusion_steps"]) != 1000,
                              "timesteps rescaled to 1000 from another step count are not supported"),
    }  # fmt: skip
    for flag, (bad, why) in refused.items():
        if bad:
            raise ModelError(f"{where}: {flag}={flags[flag]!r}: {why}")
    if flags["noise_schedule"] not in _SCHEDULES:
        raise ModelError(f"{where}: noise_schedule {flags['noise_schedule']!r} is not one of {', '.join(_SCHEDULES)}")
    size = int(flags["image_size"])
    mult = _numbers(flags["channel_mult"]) if flags["channel_mult"] else _DEFAULT_MULT.get(size)
    if not mult:
        raise ModelError(f"{where}: image_size {size} has no default channel_mult; give one, e.g. \"1,2,2\"")
    if mult[0] != 1:  # diffusers sizes the timestep embedding by the first level's width, ADM by num_channels
        raise ModelError(f"{where}: channel_mult {mult} starts at {mult[0]}; only models whose first level is "
                         "num_channels wide (channel_mult starting at 1) are supported")  # fmt: skip
    if any(int(m * flags["num_channels"]) != m * flags["num_channels"] for m in mult):
        raise ModelError(f"{where}: channel_mult {mult} times num_channels {flags['num_channels']} must be whole")
    return ADMConfig(
        image_size=size, channels=int(flags["num_channels"]), res_blocks=int(flags["num_res_blocks"]), mult=tuple(mult),
        attention_ds=frozenset(size // int(r) for r in _numbers(flags["attention_resolutions"])),
        head_channels=int(flags["num_head_channels"]), out_channels=6 if flags["learn_sigma"] else 3,
        new_attention_order=bool(flags["use_new_attention_order"]), steps=int(flags["diffusion_steps"]),
        schedule=_SCHEDULES[flags["noise_schedule"]],
    )  # fmt: skip


def _numbers(value: Any) -> tuple[Any, ...]:
    if isinstance(value, str):
        return tuple(float(v) if "." in v else int(v) for v in value.split(",") if v.strip())
    return tuple(value)


def unet_config(adm: ADMConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` config of the same network: resampling residual blocks, scale-shift norm, attention at the
    levels ADM has it, ADM's sinusoidal timestep embedding (cos first, no frequency shift)."""
    attention = [2**level in adm.attention_ds for level in range(len(adm.mult))]
    return {
        "sample_size": adm.image_size,
        "in_channels": 3,
        "out_channels": adm.out_channels,
        "block_out_channels": adm.widths,
        "layers_per_block": adm.res_blocks,
        "down_block_types": tuple("AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attention),
        "up_block_types": tuple("AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attention)),
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "resnet_time_scale_shift": "scale_shift",
        "attention_head_dim": adm.head_channels,
        "norm_num_groups": GROUPS,
        "attn_norm_num_groups": GROUPS,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "add_attention": True,
    }


def scheduler_config(adm: ADMConfig) -> dict[str, Any]:
    """DDIM over the training schedule (guided-diffusion's betas, ``abar`` before the first step 1)."""
    scale = 1000 / adm.steps  # guided-diffusion scales the linear schedule's ends to the step count
    return {
        "num_train_timesteps": adm.steps,
        "beta_schedule": adm.schedule,
        "beta_start": scale * 0.0001,
        "beta_end": scale * 0.02,
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
    }


# --- the checkpoint's layout --------------------------------------------------------------------------------------


def _res_block(old: str, new: str, cin: int, cout: int, emb: int) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    yield from (
        (f"{old}.in_layers.0.weight", f"{new}.norm1.weight", (cin,)), (f"{old}.in_layers.0.bias", f"{new}.norm1.bias", (cin,)),
        (f"{old}.in_layers.2.weight", f"{new}.conv1.weight", (cout, cin, 3, 3)), (f"{old}.in_layers.2.bias", f"{new}.conv1.bias", (cout,)),
        (f"{old}.emb_layers.1.weight", f"{new}.time_emb_proj.weight", (2 * cout, emb)),
        (f"{old}.emb_layers.1.bias", f"{new}.time_emb_proj.bias", (2 * cout,)),
        (f"{old}.out_layers.0.weight", f"{new}.norm2.weight", (cout,)), (f"{old}.out_layers.0.bias", f"{new}.norm2.bias", (cout,)),
        (f"{old}.out_layers.3.weight", f"{new}.conv2.weight", (cout, cout, 3, 3)), (f"{old}.out_layers.3.bias", f"{new}.conv2.bias", (cout,)),
    )  # fmt: skip
    if cin != cout:
        yield f"{old}.skip_connection.weight", f"{new}.conv_shortcut.weight", (cout, cin, 1, 1)
        yield f"{old}.skip_connection.bias", f"{new}.conv_shortcut.bias", (cout,)


def _attention(old: str, new: str, ch: int) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    yield f"{old}.norm.weight", f"{new}.group_norm.weight", (ch,)
    yield f"{old}.norm.bias", f"{new}.group_norm.bias", (ch,)
    yield f"{old}.qkv.weight", f"{new}.qkv.weight", (3 * ch, ch, 1)  # split by _split_qkv
    yield f"{old}.qkv.bias", f"{new}.qkv.bias", (3 * ch,)
    yield f"{old}.proj_out.weight", f"{new}.to_out.0.weight", (ch, ch, 1)
    yield f"{old}.proj_out.bias", f"{new}.to_out.0.bias", (ch,)


def layout(adm: ADMConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every tensor of the checkpoint as ``(guided-diffusion name, diffusers name, shape)``, in the order
    guided-diffusion's ``UNetModel`` builds them."""
    emb, widths, levels = 4 * adm.channels, adm.widths, len(adm.mult)
    out: list[tuple[str, str, tuple[int, ...]]] = [
        ("time_embed.0.weight", "time_embedding.linear_1.weight", (emb, adm.channels)),
        ("time_embed.0.bias", "time_embedding.linear_1.bias", (emb,)),
        ("time_embed.2.weight", "time_embedding.linear_2.weight", (emb, emb)),
        ("time_embed.2.bias", "time_embedding.linear_2.bias", (emb,)),
        ("input_blocks.0.0.weight", "conv_in.weight", (widths[0], 3, 3, 3)),
        ("input_blocks.0.0.bias", "conv_in.bias", (widths[0],)),
    ]
    block, ch, skips = 1, widths[0], [widths[0]]
    for level, width in enumerate(widths):
        for j in range(adm.res_blocks):
            out += _res_block(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", ch, width, emb)
            ch = width
            if 2**level in adm.attention_ds:
                out += _attention(f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}", ch)
            skips.append(ch)
            block += 1
        if level != levels - 1:
            out += _res_block(f"input_blocks.{block}.0", f"down_blocks.{level}.downsamplers.0", ch, ch, emb)
            skips.append(ch)
            block += 1
    out += _res_block("middle_block.0", "mid_block.resnets.0", ch, ch, emb)
    out += _attention("middle_block.1", "mid_block.attentions.0", ch)
    out += _res_block("middle_block.2", "mid_block.resnets.1", ch, ch, emb)
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        attends = 2**level in adm.attention_ds
        for i in range(adm.res_blocks + 1):
            out += _res_block(f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{i}", ch + skips.pop(), widths[level], emb)
            ch = widths[level]
            if attends:
                out += _attention(f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{i}", ch)
            if level and i == adm.res_blocks:
                out += _res_block(f"output_blocks.{block}.{1 + attends}", f"up_blocks.{up}.upsamplers.0", ch, ch, emb)
            block += 1
    out += [
        ("out.0.weight", "conv_norm_out.weight", (ch,)), ("out.0.bias", "conv_norm_out.bias", (ch,)),
        ("out.2.weight", "conv_out.weight", (adm.out_channels, widths[0], 3, 3)), ("out.2.bias", "conv_out.bias", (adm.out_channels,)),
    ]  # fmt: skip
    return out


def convert(weights: dict[str, torch.Tensor], adm: ADMConfig, what: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """A guided-diffusion state dict renamed onto ``UNet2DModel(**unet_config(adm))``.

    Raises:
        ModelError: A key missing, left over, or of another shape than the flags imply.
    """
    entries = layout(adm)
    expected = {old for old, _, _ in entries}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ModelError(f"{what} does not fit the flags in config.json: missing {missing[:3]} ({len(missing)}), "
                         f"unexpected {unexpected[:3]} ({len(unexpected)}); write the flags it was trained with")  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for old, new, shape in entries:
        tensor = weights[old]
        if tuple(tensor.shape) != shape:
            raise ModelError(f"{what}: {old} is {tuple(tensor.shape)}, the flags in config.json give {shape}; "
                             "write the flags it was trained with")  # fmt: skip
        if new.endswith(".qkv.weight") or new.endswith(".qkv.bias"):
            out.update(_split_qkv(tensor, new, adm))
        else:
            out[new] = tensor.reshape(tensor.shape[:2]) if tensor.dim() == 3 else tensor  # 1x1 conv1d -> linear
    return out


def _split_qkv(tensor: torch.Tensor, new: str, adm: ADMConfig) -> dict[str, torch.Tensor]:
    prefix, kind = new.rsplit(".qkv.", 1)
    ch = tensor.shape[0] // 3
    heads, rest = ch // adm.head_channels, tensor.shape[1:2]  # a weight's input channels; nothing for a bias
    order = (3, heads, adm.head_channels) if adm.new_attention_order else (heads, 3, adm.head_channels)
    grouped = tensor.reshape(*order, *rest)
    parts = grouped.unbind(0) if adm.new_attention_order else grouped.unbind(1)
    return {f"{prefix}.to_{name}.{kind}": part.reshape(ch, *rest).contiguous() for name, part in zip("qkv", parts, strict=True)}


class GuidedDiffusionFamily(ModelFamily):
    name = "guided_diffusion"
    libraries = (diffusers,)
    description = (
        'OpenAI guided-diffusion ADM UNet (pixel space): config.json ({"library": "guided_diffusion", flags}) with '
        "model.safetensors or the released *.pt loaded weights-only; components unet, scheduler"
    )

    def recognises(self, root: Path) -> bool:
        return read_root_config(root).get("library") == LIBRARY

    def load(
        self,
        source: ModelSource,
        *,
        component: str | None = None,
        cls: type | None = None,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> Any:
        if component not in (None, "unet", "scheduler"):
            raise ModelError(f"a guided_diffusion model has components unet and scheduler, not {component!r}")
        root = source.directory(["config.json", SAFE_WEIGHTS, f"*{PICKLED_SUFFIX}"])
        path = root / "config.json"
        if not path.is_file():
            raise ModelError(f"guided-diffusion model {source.model_id!r} has no config.json at {root}; write "
                             '{"library": "guided_diffusion"} beside 256x256_diffusion_uncond.pt (with the flags '
                             "of any other checkpoint)")  # fmt: skip
        adm = adm_config(read_json_file(path), str(path))
        if component == "scheduler":
            scheduler_cls = cls or diffusers.DDIMScheduler
            return scheduler_cls.from_config(scheduler_config(adm))
        if cls not in (None, diffusers.UNet2DModel):
            raise ModelError(f"a guided_diffusion UNet loads as UNet2DModel, not {cls.__qualname__}; leave cls unset")
        what = f"the checkpoint of guided-diffusion model {source.model_id!r}"
        weights = read_checkpoint(root, SAFE_WEIGHTS, f"*{PICKLED_SUFFIX}", f"guided-diffusion model {source.model_id!r} "
                                  "needs its weights", "e.g. 256x256_diffusion_uncond.pt")  # fmt: skip
        if not is_state_dict(weights):
            raise ModelError(f"{what} is not a state dict (names to tensors)")
        with torch.device("meta"):  # no random init of half a billion weights about to be replaced
            unet = diffusers.UNet2DModel(**unet_config(adm))
        target = torch_dtype(dtype)
        unet.load_state_dict({k: v.to(target) for k, v in convert(weights, adm, what).items()}, strict=True, assign=True)
        return unet.to(device).eval().requires_grad_(False)
