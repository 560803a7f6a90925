"""LPIPS v0.1 on VGG16 (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", Sec. 3, Eq. 1), as a frozen, differentiable distance between two image batches: Soundini's
perceptual background term compares ``(1 - M) x`` with ``(1 - M) x_src`` through it (methods.md 5.5).

Contract: ``x`` and ``y`` are ``(N, 3, H, W)`` in [-1, 1]; the distance is ``(N,)``, one per image pair,
zero for identical images, and differentiable w.r.t. both inputs. The network holds no trainable state:
its parameters never require grad and it runs in eval mode (LPIPS' dropout sits before the linear
layers and is a no-op at inference).

    d(x, y) = sum_l mean_{h,w} w_l . (yhat^l_hw(x) - yhat^l_hw(y))^2

Notation (paper's symbols): ``feats[l]`` = y^l, the activations after relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3 of torchvision's VGG16 ``features``, run on the input shifted and scaled by ``SHIFT`` and ``SCALE``
(lpips' ``ScalingLayer``, which maps [-1, 1] to ImageNet statistics); ``_unit(feats[l])`` = yhat^l, unit
length across channels at each pixel (``x / (||x|| + 1e-10)``, as lpips normalises); ``lins[l].weight``
= w_l, ``(1, C_l, 1, 1)``, the 1x1 convolution without bias that lpips calls ``lin{l}``.

Weights keep the names they are published under, so converting a file between pickle and safetensors is
the whole conversion (:func:`lpips_state_dict` maps them onto this module and checks them):

- the trunk, torchvision's ImageNet VGG16 (``vgg16-397923af.pth``): a state dict of the whole network, of
  which the 13 convolutions ``features.{i}.weight`` / ``features.{i}.bias`` are used; ``classifier.*`` is
  dropped, and any other key is refused;
- the linear layers, the lpips package's ``weights/v0.1/vgg.pth``: ``lin{l}.model.1.weight``, l = 0..4.

The distance head (normalisation, squared difference, weighting, mean) runs in float32 whatever the
trunk's dtype, since the 1e-10 of the normalisation underflows to zero in half precision and a feature
that is zero at a pixel (a masked-out region) would then give 0/0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from reelflow.schemas.errors import ModelError

# torchvision's VGG16 ("D") features: conv widths, "M" a 2x2 max-pool; each conv is followed by a ReLU.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512
)  # fmt: skip
LEVEL_ENDS = (4, 9, 16, 23, 30)  # features[:4] ends at relu1_2, [:9] relu2_2, ... [:30] relu5_3 (lpips' slices)
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
_DROPPED_PREFIX = "classifier."


class LpipsVgg(torch.nn.Module):
    """LPIPS v0.1 with the VGG16 trunk: ``forward(x, y)`` is the ``(N,)`` distance between two image batches.

    Built with PyTorch's default random weights; :func:`lpips_state_dict` gives what ``load_state_dict``
    needs from the published files. Its state dict holds ``features.{i}.weight|bias`` (torchvision's
    indices) and ``lins.{l}.weight``; the shift and scale are constants, not state.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        in_channels = 3
        for width in VGG16_CFG:
            if width == "M":
                layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            # Not in place (torchvision's are): a guidance loss backpropagates through every level.
            layers += [torch.nn.Conv2d(in_channels, int(width), kernel_size=3, padding=1), torch.nn.ReLU()]
            in_channels = int(width)
        self.features = torch.nn.Sequential(*layers)
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def levels(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five trunk activations y^l (relu1_2 ... relu5_3) of ``(N, 3, H, W)`` images in [-1, 1]."""
        h = (images.to(self.shift.dtype) - self.shift) / self.scale
        feats, start = [], 0
        for end in LEVEL_ENDS:
            h = self.features[start:end](h)
            feats.append(h)
            start = end
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The LPIPS distance per image pair, ``(N,)`` float32, of ``x`` and ``y``, both ``(N, 3, H, W)`` in [-1, 1].

        Raises:
            ValueError: The batches differ in shape or are not three-channel images.
        """
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            shapes = f"{tuple(x.shape)}, {tuple(y.shape)}"
            raise ValueError(f"LPIPS compares two (N, 3, H, W) batches of one shape; got {shapes}")
        n = x.shape[0]
        distance = x.new_zeros(n, dtype=torch.float32)
        # One trunk pass over both batches: VGG has no batch statistics, so this equals two passes.
        for feat, lin in zip(self.levels(torch.cat([x, y.to(x.dtype)])), self.lins, strict=True):
            unit = _unit(feat.float())
            diff = (unit[:n] - unit[n:]) ** 2
            # The 1x1 convolution commutes with the spatial mean, so weight the (N, C) means instead of every pixel.
            distance = distance + (diff.mean(dim=(2, 3)) * lin.weight.float().flatten()).sum(dim=1)
        return distance


def _unit(feat: torch.Tensor) -> torch.Tensor:
    """``feat`` divided by its norm across channels at each pixel, plus ``EPS`` (lpips' ``normalize_tensor``). Where
    every channel is zero the norm's gradient is not finite, but the features are ReLU outputs, whose backward
    passes nothing there."""
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)


def lpips_state_dict(
    backbone: Mapping[str, torch.Tensor], lin: Mapping[str, torch.Tensor], *, backbone_file: str = "backbone",
    lin_file: str = "lin",
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The state dict of :class:`LpipsVgg` from the weights as published: torchvision's VGG16 state dict
    (``classifier.*`` dropped) and lpips' ``lin{l}.model.1.weight``.

    ``backbone_file`` and ``lin_file`` name where each came from, for messages.

    Raises:
        ModelError: A key missing or left over, or a tensor of the wrong shape; the message names the file and keys.
    """
    trunk = {k: v for k, v in backbone.items() if not k.startswith(_DROPPED_PREFIX)}
    vgg = "torchvision's VGG16 state dict (features.{i}.weight, features.{i}.bias; classifier.* is ignored)"
    _check(trunk, _trunk_shapes(), backbone_file, vgg)
    published = {f"lin{level}.model.1.weight": (1, c, 1, 1) for level, c in enumerate(CHANNELS)}
    _check(lin, published, lin_file, "lpips' v0.1 vgg.pth (lin0.model.1.weight ... lin4.model.1.weight)")
    return {**trunk, **{f"lins.{level}.weight": lin[key] for level, key in enumerate(published)}}


def _trunk_shapes() -> dict[str, tuple[int, ...]]:
    """``features.{i}.weight|bias`` shapes of VGG16 up to relu5_3, at torchvision's indices."""
    shapes: dict[str, tuple[int, ...]] = {}
    index, in_channels = 0, 3
    for width in VGG16_CFG:
        if width != "M":
            shapes[f"features.{index}.weight"] = (int(width), in_channels, 3, 3)
            shapes[f"features.{index}.bias"] = (int(width),)
            in_channels = int(width)
        index += 1 if width == "M" else 2
    return shapes


def _check(found: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], file: str, layout: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = [f"{k} {tuple(v.shape)} (wants {expected[k]})" for k, v in found.items()
                 if k in expected and tuple(v.shape) != expected[k]]  # fmt: skip
    if missing or unexpected or misshapen:
        raise ModelError(f"the LPIPS weights in {file} are not {layout}: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, misshapen {misshapen[:3]}; save that file as published")  # fmt: skip
