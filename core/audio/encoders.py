"""The CLIP-aligned audio encoders of Soundini (Lee et al. 2023) and its CVPR 2022 predecessor (Lee et al.,
"Sound-Guided Semantic Image Manipulation"), in their own state-dict layouts, each with the exact
input transform it was trained on (methods.md 5.3):

- ``swin_tiny`` (Soundini's ``SwinAudioEncoder``): ``feature_extractor`` = timm
  ``swin_tiny_patch4_window7_224`` with one input channel and a 512-d head, plus its two logit
  scales (``logit_scale_ai``, ``logit_scale_at``, unused at inference but in the checkpoint). Input:
  the ``(128, 864)`` window resized (OpenCV bilinear) to ``224 x 224``.
- ``resnet18`` (the predecessor's ``AudioEncoder``): ``conv`` (3x3, 1 to 3 channels, no padding) then
  ``feature_extractor`` = timm ``resnet18`` with a 512-d head. Input: the window resized to 512
  rows by 128 columns, then reshaped (not transposed) to ``(1, 128, 512)``: a quirk of the
  reference code that its weights depend on.

Embeddings are 512-d, in CLIP ViT-B/32's image-text space, and are returned as the encoder gives
them (the losses normalise).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import timm
import torch

EMBEDDING_DIM = 512
ARCHITECTURES: dict[str, type[AudioEncoder]] = {}


class AudioEncoder(torch.nn.Module):
    """A spectrogram-window encoder: :meth:`inputs` turns ``(n, 128, 864)`` windows into what it was trained on."""

    architecture: ClassVar[str]
    timm_name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ARCHITECTURES[cls.architecture] = cls

    def inputs(self, windows: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, windows: np.ndarray) -> torch.Tensor:
        """``(n, 512)`` float32 embeddings of ``(n, 128, 864)`` windows in [0, 1]."""
        parameter = next(self.parameters())
        with torch.inference_mode():
            return self(self.inputs(windows).to(parameter.device, parameter.dtype)).float().cpu()


class SwinAudioEncoder(AudioEncoder):
    architecture = "swin_tiny"
    timm_name = "swin_tiny_patch4_window7_224"

    def __init__(self, **timm_args: Any) -> None:
        super().__init__()
        self.feature_extractor = timm.create_model(self.timm_name, pretrained=False, in_chans=1,
                                                   num_classes=EMBEDDING_DIM, **timm_args)  # fmt: skip
        self.logit_scale_ai = torch.nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        self.logit_scale_at = torch.nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def inputs(self, windows: np.ndarray) -> torch.Tensor:
        import cv2

        size = self.feature_extractor.patch_embed.img_size
        resized = [cv2.resize(w.astype(np.float64), (size[1], size[0])) for w in windows]  # dsize is (width, height)
        return torch.from_numpy(np.stack(resized)[:, None]).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_extractor(x)


class ResNetAudioEncoder(AudioEncoder):
    architecture = "resnet18"
    timm_name = "resnet18"
    ROWS, COLUMNS = 512, 128  # the reference resize, before its reshape to (128, 512)

    def __init__(self, **timm_args: Any) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, (3, 3))
        self.feature_extractor = timm.create_model(self.timm_name, pretrained=False, num_classes=EMBEDDING_DIM, **timm_args)

    def inputs(self, windows: np.ndarray) -> torch.Tensor:
        import cv2

        resized = np.stack([cv2.resize(w.astype(np.float64), (self.COLUMNS, self.ROWS)) for w in windows])  # (n, 512, 128)
        return torch.from_numpy(resized.reshape(len(windows), 1, self.COLUMNS, self.ROWS)).float()  # the reshape quirk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_extractor(self.conv(x))


def build_encoder(architecture: str, **timm_args: Any) -> AudioEncoder:
    """An encoder of ``architecture`` (``swin_tiny`` or ``resnet18``) with random weights; ``timm_args`` shrink it."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown audio encoder architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[architecture](**timm_args)
