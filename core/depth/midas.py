"""MiDaS v3.x DPT depth models over timm backbones, in the module layout of the official checkpoints.

DPT (Ranftl et al., "Vision Transformers for Dense Prediction", ICCV 2021, §3): the tokens of a ViT
at four blocks are *reassembled* into image-like maps at 1/4, 1/8, 1/16 and 1/32 of the input
(readout token handling, a 1x1 projection, then resampling), *fused* coarse to fine by residual
convolution units, and a small *head* upsamples to the input size and regresses relative inverse
depth. MiDaS v3.0 (DPT-Large, ViT-L/16 at 384) and v3.1 (BEiT-L/16 at 512; Birkl et al. 2023)
publish their weights as plain state dicts keyed by the module tree of isl-org/MiDaS
(``midas/dpt_depth.py``, ``midas/blocks.py``, ``midas/backbones/{vit,beit,utils}.py``). The modules
here carry the same names, so those files load unchanged:

    pretrained.model.*               the timm backbone, as timm names its parameters
    pretrained.act_postprocess{i}.*  reassemble stage i: 0.project.0 (readout), 3 (1x1), 4 (resample)
    scratch.layer{i}_rn.weight       3x3 convolution from stage i's width to the fusion width
    scratch.refinenet{i}.*           fusion block i: resConfUnit1, resConfUnit2, out_conv
    scratch.output_conv.*            head: 0 and 2 (3x3), 4 (1x1); the others hold no parameters

Input sizes: any height and width that are multiples of the backbone's patch size (16). At the
native size (:attr:`MidasArchitecture.input_size`) the backbone runs as trained; at other sizes the
ViT's absolute position embedding and BEiT's relative position bias tables are resized bilinearly,
as MiDaS's own ``_resize_pos_embed`` and ``_get_rel_pos_bias`` do. The model is for inference:
dropout and drop-path are never applied.

Output: relative inverse depth (larger is nearer), non-negative, at the input resolution, known up
to a scale and shift per image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from reelflow.schemas.errors import ModelError

Readout = Literal["ignore", "add", "project"]


@dataclass(frozen=True)
class MidasArchitecture:
    """One MiDaS DPT configuration: which timm backbone, where it is tapped, and the head's widths.

    Attributes:
        backbone: The timm model name, built with ``pretrained=False`` (the checkpoint has its weights).
        kind: How tokens pass through the backbone: ``"vit"`` (absolute position embedding) or
            ``"beit"`` (relative position bias per block).
        hooks: The four blocks whose outputs are reassembled, shallow to deep.
        reassemble_channels: Each reassembled map's width (MiDaS's ``features`` list of ``_make_encoder``).
        features: The fusion width (``scratch.layer*_rn`` outputs, refinenets, the head's input).
        head_channels: The head's last hidden width (MiDaS's ``head_features_2``).
        readout: What happens to the class token: dropped, added, or projected with each token.
        input_size: The native square input side, in pixels; the backbone is built for it.
        mean: Per-channel mean subtracted from ``[0, 1]`` pixels before the model.
        std: Per-channel divisor applied after the mean.
        backbone_args: Extra keywords for ``timm.create_model`` (a tiny test backbone's widths).
    """

    backbone: str
    kind: Literal["vit", "beit"]
    hooks: tuple[int, ...]
    reassemble_channels: tuple[int, ...]
    features: int = 256
    head_channels: int = 32
    readout: Readout = "project"
    input_size: int = 384
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    backbone_args: Mapping[str, Any] = field(default_factory=dict)


# isl-org/MiDaS midas/model_loader.py and midas/dpt_depth.py: the v3.0 and v3.1 transformer models.
ARCHITECTURES: dict[str, MidasArchitecture] = {
    "dpt_large_384": MidasArchitecture(
        "vit_large_patch16_384", "vit", (5, 11, 17, 23), (256, 512, 1024, 1024), input_size=384
    ),
    "dpt_beit_large_512": MidasArchitecture(
        "beit_large_patch16_512", "beit", (5, 11, 17, 23), (256, 512, 1024, 1024), input_size=512
    ),
    "dpt_beit_large_384": MidasArchitecture(
        "beit_large_patch16_384", "beit", (5, 11, 17, 23), (256, 512, 1024, 1024), input_size=384
    ),
    "dpt_beit_base_384": MidasArchitecture(
        "beit_base_patch16_384", "beit", (2, 5, 8, 11), (96, 192, 384, 768), input_size=384
    ),
}


def resolve_architecture(name: str, model_args: Mapping[str, Any] | None = None) -> MidasArchitecture:
    """The architecture called ``name`` with the fields in ``model_args`` replaced.

    Raises:
        ModelError: Unknown name or field; the message lists the valid ones.
    """
    if name not in ARCHITECTURES:
        raise ModelError(f"unknown MiDaS architecture {name!r}; valid: {', '.join(ARCHITECTURES)}")
    args = dict(model_args or {})
    valid = {f.name for f in dataclasses.fields(MidasArchitecture)}
    if unknown := sorted(args.keys() - valid):
        raise ModelError(f"unknown MiDaS model_args {unknown}; valid: {', '.join(sorted(valid))}")
    for key in ("hooks", "reassemble_channels", "mean", "std"):
        if key in args:
            args[key] = tuple(args[key])
    return dataclasses.replace(ARCHITECTURES[name], **args)


class MidasDPT(nn.Module):
    """A MiDaS DPT depth model whose ``state_dict`` keys are those of the official checkpoints.

    Args:
        architecture: A key of :data:`ARCHITECTURES`.
        model_args: Fields of :class:`MidasArchitecture` to replace (a tiny model of the same layout).

    Raises:
        ModelError: Unknown architecture or field, a backbone timm does not have, or hooks and
            backbone that do not fit together.
    """

    def __init__(self, architecture: str, model_args: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.architecture_name = architecture
        self.architecture = arch = resolve_architecture(architecture, model_args)
        self.pretrained = _Encoder(arch)
        self.scratch = _Decoder(arch)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Relative inverse depth of normalised images.

        Args:
            pixels: ``torch.Tensor`` of shape ``(B, 3, H, W)``, normalised with the architecture's
                ``mean`` and ``std``; ``H`` and ``W`` multiples of the patch size.

        Returns:
            Inverse depth, ``torch.Tensor`` of shape ``(B, H, W)``, non-negative.
        """
        return self.scratch(self.pretrained(pixels))


def midas_state_dict(model: MidasDPT) -> dict[str, torch.Tensor]:
    """``model``'s weights laid out as MiDaS publishes them.

    That is ``model.state_dict()`` plus, for BEiT, each block's ``attn.relative_position_index``:
    the timm MiDaS trained with saved that buffer; current timm derives it and does not save it.
    """
    return {**model.state_dict(), **_derived_buffers(model)}


def load_midas_state_dict(model: MidasDPT, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load an official-layout state dict into ``model``, every key used and none missing.

    Derived buffers (BEiT's ``relative_position_index``) may be absent; when present they must equal
    what ``model`` derives, since a different index would mean a different window size.

    Raises:
        ModelError: Keys missing or unexpected (named), a tensor of the wrong shape, or a derived
            buffer that differs.
    """
    given = dict(state_dict)
    for name, derived in _derived_buffers(model).items():
        if name in given and not torch.equal(given.pop(name).to("cpu"), derived.to("cpu")):
            raise ModelError(
                f"{name} in the checkpoint differs from the one {model.architecture_name} derives; "
                "the weights are for another input size or backbone"
            )
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    if missing or unexpected:
        raise ModelError(
            f"the weights do not fit MiDaS {model.architecture_name}: missing {_listing(missing)}; "
            f"unexpected {_listing(unexpected)}"
        )
    if wrong := [k for k, v in expected.items() if given[k].shape != v.shape]:
        shapes = ", ".join(f"{k} {tuple(given[k].shape)} (wants {tuple(expected[k].shape)})" for k in wrong[:5])
        raise ModelError(f"the weights do not fit MiDaS {model.architecture_name}: wrong shapes: {shapes}")
    model.load_state_dict(given, strict=True)


def _listing(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _derived_buffers(model: MidasDPT) -> dict[str, torch.Tensor]:
    if model.architecture.kind != "beit":
        return {}
    from timm.models.beit import gen_relative_position_index

    return {
        f"pretrained.model.blocks.{i}.attn.relative_position_index": gen_relative_position_index(
            block.attn.window_size
        )
        for i, block in enumerate(model.pretrained.model.blocks)
        if block.attn.relative_position_bias_table is not None
    }


# --- backbone: tokens at the hooked blocks ---------------------------------------------------------


class _Encoder(nn.Module):
    """MiDaS's ``pretrained``: the timm backbone as ``model`` and the reassemble stages beside it."""

    def __init__(self, arch: MidasArchitecture) -> None:
        super().__init__()
        # timm takes about a second to import; only processes that build a MiDaS model pay for it.
        import timm

        if not timm.is_model(arch.backbone):
            raise ModelError(f"timm {timm.__version__} has no backbone {arch.backbone!r}; upgrade timm")
        if "img_size" in arch.backbone_args:
            raise ModelError("give the input size as model_args.input_size, not backbone_args.img_size")
        try:
            self.model = timm.create_model(
                arch.backbone, pretrained=False, img_size=arch.input_size, **arch.backbone_args
            )
        except TypeError as exc:
            raise ModelError(f"cannot build timm {arch.backbone} with {dict(arch.backbone_args)}: {exc}") from exc
        _check_backbone(self.model, arch)
        self.kind, self.hooks = arch.kind, arch.hooks
        width = self.model.embed_dim
        for stage, channels in enumerate(arch.reassemble_channels):
            # MiDaS numbers its stages from 1.
            self.add_module(f"act_postprocess{stage + 1}", _Reassemble(stage, width, channels, arch.readout))

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Reassembled maps at 1/4, 1/8, 1/16 and 1/32 of ``pixels`` (B, 3, H, W)."""
        grid = _token_grid(pixels, self.model.patch_embed.patch_size)
        tokens = _TOKEN_PASSES[self.kind](self.model, pixels, grid, self.hooks)
        stages = [self.get_submodule(f"act_postprocess{i + 1}") for i in range(len(tokens))]
        return [stage(t, grid) for stage, t in zip(stages, tokens)]


def _check_backbone(model: nn.Module, arch: MidasArchitecture) -> None:
    depth = len(model.blocks)
    hooks = arch.hooks
    if len(hooks) != 4 or len(arch.reassemble_channels) != 4 or list(hooks) != sorted(set(hooks)) or hooks[-1] >= depth:
        raise ModelError(
            f"MiDaS {arch.backbone} needs four increasing hooks below its depth {depth} and four "
            f"reassemble widths; got hooks {hooks}, widths {arch.reassemble_channels}"
        )
    if getattr(model, "num_prefix_tokens", None) != 1 or getattr(model, "no_embed_class", False):
        raise ModelError(
            f"MiDaS needs a backbone with one class token that has a position embedding; {arch.backbone} is not one"
        )
    if arch.kind == "beit" and getattr(model, "rel_pos_bias", None) is not None:
        raise ModelError(f"{arch.backbone} shares one relative position bias across blocks, which MiDaS never used")


def _token_grid(pixels: torch.Tensor, patch: tuple[int, int]) -> tuple[int, int]:
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"MiDaS takes pixels of shape (B, 3, H, W); got {tuple(pixels.shape)}")
    height, width = pixels.shape[-2:]
    if height % patch[0] or width % patch[1]:
        raise ValueError(f"MiDaS input {height}x{width} is not a multiple of the patch size {patch[0]}x{patch[1]}")
    return height // patch[0], width // patch[1]


def _embed_patches(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Patch tokens with the class token in front: (B, 1 + h*w, C)."""
    patches = model.patch_embed.norm(model.patch_embed.proj(pixels).flatten(2).transpose(1, 2))
    return torch.cat([model.cls_token.expand(len(patches), -1, -1), patches], dim=1)


def _resized_pos_embed(pos_embed: torch.Tensor, native: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    if tuple(native) == grid:
        return pos_embed
    # MiDaS midas/backbones/vit.py _resize_pos_embed: the grid part bilinearly, the class token's kept.
    cells = pos_embed[:, 1:].reshape(1, *native, -1).permute(0, 3, 1, 2)
    cells = F.interpolate(cells, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([pos_embed[:, :1], cells.flatten(2).transpose(1, 2)], dim=1)


def _vit_tokens(
    model: nn.Module, pixels: torch.Tensor, grid: tuple[int, int], hooks: tuple[int, ...]
) -> list[torch.Tensor]:
    """The outputs of the hooked blocks of a timm ``VisionTransformer``, each (B, 1 + h*w, C)."""
    x = _embed_patches(model, pixels)
    x = model.norm_pre(x + _resized_pos_embed(model.pos_embed, model.patch_embed.grid_size, grid))
    taken = []
    # Blocks past the last hook, and the final norm, do not reach the depth map.
    for index, block in enumerate(model.blocks[: hooks[-1] + 1]):
        x = block(x)
        if index in hooks:
            taken.append(x)
    return taken


def _beit_tokens(
    model: nn.Module, pixels: torch.Tensor, grid: tuple[int, int], hooks: tuple[int, ...]
) -> list[torch.Tensor]:
    """The outputs of the hooked blocks of a timm ``Beit``, each (B, 1 + h*w, C), at any grid."""
    from timm.models.beit import gen_relative_position_index

    x = _embed_patches(model, pixels)
    if model.pos_embed is not None:
        x = x + _resized_pos_embed(model.pos_embed, model.patch_embed.grid_size, grid)
    index = gen_relative_position_index(grid, device=pixels.device)
    taken = []
    for number, block in enumerate(model.blocks[: hooks[-1] + 1]):
        x = _beit_block(block, x, _relative_position_bias(block.attn, grid, index))
        if number in hooks:
            taken.append(x)
    return taken


def _relative_position_bias(attn: nn.Module, grid: tuple[int, int], index: torch.Tensor) -> torch.Tensor | None:
    """One block's attention bias for a ``grid`` of patches and the class token: (1, heads, N, N)."""
    table = attn.relative_position_bias_table
    if table is None:
        return None
    native = tuple(attn.window_size)
    if native != grid:
        # MiDaS midas/backbones/beit.py _get_rel_pos_bias: the (2h-1)x(2w-1) table of relative offsets
        # is resized bilinearly; the last three rows (class token to patch, patch to class, class to
        # class) are kept.
        offsets = table[:-3].reshape(1, 2 * native[0] - 1, 2 * native[1] - 1, -1).permute(0, 3, 1, 2)
        offsets = F.interpolate(offsets, size=(2 * grid[0] - 1, 2 * grid[1] - 1), mode="bilinear", align_corners=False)
        table = torch.cat([offsets.permute(0, 2, 3, 1).flatten(0, 2), table[-3:]])
    tokens = grid[0] * grid[1] + 1
    return table[index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)


def _beit_block(block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """timm's BEiT ``Block`` at inference, with the attention bias given rather than its own."""
    attended = _beit_attention(block.attn, block.norm1(x), bias)
    x = x + (attended if block.gamma_1 is None else block.gamma_1 * attended)
    mixed = block.mlp(block.norm2(x))
    return x + (mixed if block.gamma_2 is None else block.gamma_2 * mixed)


def _beit_attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    batch, tokens, _ = x.shape
    qkv_bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, qkv_bias).reshape(batch, tokens, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    mask = None if bias is None else bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


_TOKEN_PASSES: dict[str, Callable[..., list[torch.Tensor]]] = {"vit": _vit_tokens, "beit": _beit_tokens}


# --- reassemble, fuse, regress ---------------------------------------------------------------------


class _Readout(nn.Module):
    """The patch tokens (B, h*w, C) with the class token dropped, added, or projected in (DPT §3)."""

    def __init__(self, mode: Readout, width: int) -> None:
        super().__init__()
        if mode not in ("ignore", "add", "project"):
            raise ModelError(f"unknown MiDaS readout {mode!r}; valid: ignore, add, project")
        self.mode = mode
        if mode == "project":
            self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cls, patches = tokens[:, :1], tokens[:, 1:]
        if self.mode == "ignore":
            return patches
        if self.mode == "add":
            return patches + cls
        return self.project(torch.cat([patches, cls.expand_as(patches)], dim=-1))


class _Reassemble(nn.Module):
    """One reassemble stage: tokens to a map at 4, 2, 1 or 1/2 times the patch grid.

    The children keep the indices they have in MiDaS's ``nn.Sequential`` (1 and 2 were its
    parameter-free transpose and unflatten), so the checkpoint's keys fit.
    """

    def __init__(self, stage: int, width: int, channels: int, readout: Readout) -> None:
        super().__init__()
        self.add_module("0", _Readout(readout, width))
        self.add_module("3", nn.Conv2d(width, channels, kernel_size=1))
        resample = {
            0: lambda: nn.ConvTranspose2d(channels, channels, kernel_size=4, stride=4),
            1: lambda: nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
            3: lambda: nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1),
        }.get(stage)
        if resample is not None:
            self.add_module("4", resample())

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, 1 + h*w, C) tokens to a (B, channels, h', w') map."""
        patches = self.get_submodule("0")(tokens)
        x = self.get_submodule("3")(patches.transpose(1, 2).unflatten(2, grid))
        return self.get_submodule("4")(x) if "4" in self._modules else x


class _ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    """DPT §3 fusion: add the residual-refined skip map, refine, upsample, project (1x1)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        # MiDaS's attribute names, which its checkpoint keys spell.
        self.resConfUnit1 = _ResidualConvUnit(features)
        self.resConfUnit2 = _ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        scale = None if size is not None else 2.0
        x = F.interpolate(x, size=size, scale_factor=scale, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class _Decoder(nn.Module):
    """MiDaS's ``scratch``: per-stage 3x3 convolutions, four fusion blocks and the depth head."""

    def __init__(self, arch: MidasArchitecture) -> None:
        super().__init__()
        features, head = arch.features, arch.head_channels
        for stage, channels in enumerate(arch.reassemble_channels):
            conv = nn.Conv2d(channels, features, kernel_size=3, padding=1, bias=False)
            self.add_module(f"layer{stage + 1}_rn", conv)
            self.add_module(f"refinenet{stage + 1}", _FusionBlock(features))
        # The final ReLU keeps inverse depth non-negative (MiDaS's non_negative=True).
        self.output_conv = nn.Sequential(
            nn.Conv2d(features, features // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, head, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(head, 1, kernel_size=1),
            nn.ReLU(),
        )

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Four reassembled maps, finest first, to inverse depth (B, H, W)."""
        l1, l2, l3, l4 = (self.get_submodule(f"layer{i + 1}_rn")(m) for i, m in enumerate(maps))
        path = self.refinenet4(l4, size=l3.shape[-2:])
        path = self.refinenet3(path, l3, size=l2.shape[-2:])
        path = self.refinenet2(path, l2, size=l1.shape[-2:])
        path = self.refinenet1(path, l1)
        return self.output_conv(path).squeeze(1)
