"""Relative inverse depth of video frames with any depth model, and its normalisation over a clip.

Contract: :func:`depth_predictor` turns a loaded depth model (a transformers depth model with its
image processor, or a :class:`~reelflow.core.depth.midas.MidasDPT`) into a :class:`Predictor` that
maps uint8 frames ``(B, H, W, 3)`` to the model's raw relative inverse depth ``(B, H, W)`` (float32,
larger is nearer, known up to a scale and shift per image) at the frames' own size. Frames stay one
batched tensor from the store to the model: no PIL round trip.

Preprocessing follows DPT (Ranftl et al. 2021, §4 and its reference transforms; MiDaS's
``transforms.Resize`` with ``resize_method="minimal"``; transformers' ``DPTImageProcessor``): scale as
little as possible to reach the model's size, keeping the aspect ratio where the model does, round
each side to the model's multiple, resample bicubic, scale to [0, 1], subtract the mean and divide by
the std. The prediction is resized back bicubic, as ``post_process_depth_estimation`` and MiDaS's
``run.py`` do.

:func:`normalise_depth` maps stored raw depth to [0, 1]: per video with one scale and shift for the
whole clip (two passes, a chunk of frames at a time, so memory stays flat for long clips), or per
frame with each frame's own extremes, which the per-image scale drift of these models makes flicker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import singledispatch
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from reelflow.schemas.errors import ModelError

Resample = Literal["torchvision", "opencv"]
Normalisation = Literal["video", "frame"]
# transformers depth models whose predicted_depth is metric depth, not relative inverse depth.
METRIC_MODEL_TYPES = frozenset({"zoedepth", "depth_pro", "glpn"})
# isl-org/MiDaS run.py: DPT models see frames scaled "minimal", aspect kept, sides multiples of 32.
MIDAS_MULTIPLE = 32


class FrameArray(Protocol):
    """Frames that can be read a slice at a time: a ``zarr.Array`` or a ``np.ndarray`` ``(F, H, W, 3)``."""

    shape: tuple[int, ...]

    def __getitem__(self, index: slice) -> Any: ...


@dataclass(frozen=True)
class Preprocessing:
    """How frames become a depth model's input.

    ``size`` is the (height, width) asked for; ``keep_aspect_ratio`` scales both sides by the factor
    nearer 1 (DPT's "minimal"); each side is then rounded to ``multiple``. ``resample`` names whose
    bicubic resize is mirrored: ``torchvision`` (uint8 images, antialiased, rounded back to uint8, as
    transformers' processors do) or ``opencv`` (float images, no antialiasing: MiDaS's ``cv2.INTER_CUBIC``).
    """

    size: tuple[int, int]
    keep_aspect_ratio: bool
    multiple: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: Resample = "torchvision"

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the model sees of a ``height`` x ``width`` frame."""
        scale_h, scale_w = self.size[0] / height, self.size[1] / width
        if self.keep_aspect_ratio:
            scale_h = scale_w = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
        return _to_multiple(scale_h * height, self.multiple), _to_multiple(scale_w * width, self.multiple)

    def with_side(self, side: int | None) -> Preprocessing:
        """The same rule asked for a ``side`` x ``side`` input (None: unchanged)."""
        return self if side is None else dataclasses.replace(self, size=(side, side))

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``(B, 3, h, w)`` (float32) of uint8 frames ``(B, H, W, 3)``."""
        images = frames.permute(0, 3, 1, 2)
        size = self.input_size(*frames.shape[1:3])
        if size != tuple(frames.shape[1:3]):
            images = _RESIZE[self.resample](images, size)
        pixels = images.float() / 255.0
        mean = pixels.new_tensor(self.mean).view(1, 3, 1, 1)
        std = pixels.new_tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std


def _resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's ``resize`` of uint8 images, bicubic with antialiasing: torch's native uint8 kernel on the
    CPU, elsewhere float, then clamped and rounded back to uint8."""
    if images.device.type == "cpu":
        return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    resized = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(0, 255).round()


def _resize_float(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """OpenCV's ``INTER_CUBIC`` on float images (no antialiasing), as MiDaS's transforms resize."""
    return F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)


_RESIZE: dict[str, Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]] = {
    "torchvision": _resize_uint8,
    "opencv": _resize_float,
}


def _to_multiple(value: float, multiple: int) -> int:
    # transformers' DPT constrain_to_multiple_of (MiDaS's Resize.constrain_to_multiple_of), no upper bound
    rounded = round(value / multiple) * multiple
    return rounded if rounded >= multiple else multiple


@dataclass(frozen=True)
class Predictor:
    """A depth model ready for frames: ``predictor(frames)`` is raw inverse depth at the frames' size.

    ``forward`` maps normalised pixels ``(B, 3, h, w)`` to raw inverse depth ``(B, h', w')``; ``backend``
    names the model class (``transformers:DPTForDepthEstimation``, ``midas:dpt_beit_large_512``).
    """

    backend: str
    preprocessing: Preprocessing
    forward: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    dtype: torch.dtype

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        return self.preprocessing.input_size(height, width)

    def with_input_size(self, side: int | None) -> Predictor:
        """The predictor asking the model for a ``side`` x ``side`` input instead of its own (None: unchanged)."""
        return dataclasses.replace(self, preprocessing=self.preprocessing.with_side(side))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """Raw inverse depth ``(B, H, W)`` (float32) of uint8 frames ``(B, H, W, 3)``."""
        batch = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        pixels = self.preprocessing(batch).to(self.dtype)
        with torch.inference_mode():
            depth = self.forward(pixels).float()
        return resize_depth(depth, frames.shape[1:3]).cpu().numpy()


def resize_depth(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Depth ``(B, h, w)`` resized bicubic to ``size`` (height, width), as ``post_process_depth_estimation``."""
    if tuple(depth.shape[-2:]) == tuple(size):
        return depth
    return F.interpolate(depth[:, None], size=tuple(size), mode="bicubic", align_corners=False)[:, 0]


@singledispatch
def depth_predictor(model: Any, processor: Any = None) -> Predictor:
    """The :class:`Predictor` of a loaded depth model, by the model's type.

    transformers models (``DPTForDepthEstimation``, ``DepthAnythingForDepthEstimation``, any whose
    output has ``predicted_depth``) take their image ``processor``'s size, aspect rule, multiple, mean
    and std; metric-depth models' output is inverted. A ``MidasDPT`` takes its architecture's input
    size, mean and std, and MiDaS's own resize rule.

    Raises:
        ModelError: A model of another type, or a transformers model without its processor.
    """
    from reelflow.core.depth.midas import MidasDPT  # its backbones come from timm, imported only when used

    if isinstance(model, MidasDPT):
        return _midas_predictor(model)
    raise ModelError(
        f"no depth backend for a {type(model).__module__}.{type(model).__name__}; give a transformers depth model "
        "(AutoModelForDepthEstimation) with its image processor, or a MiDaS DPT (reelflow.core.depth.midas.MidasDPT)"
    )


@depth_predictor.register
def _transformers_predictor(model: PreTrainedModel, processor: Any = None) -> Predictor:
    if processor is None:
        raise ModelError(f"the transformers depth model {type(model).__name__} needs its image processor "
                         "(the model's `image_processor` component) to know its input size, mean and std")  # fmt: skip
    _check_processor(processor)
    size = processor.size
    normalise = getattr(processor, "do_normalize", True)
    preprocessing = Preprocessing(
        size=(int(size["height"]), int(size["width"])),
        keep_aspect_ratio=bool(getattr(processor, "keep_aspect_ratio", False)),
        multiple=int(getattr(processor, "ensure_multiple_of", None) or 1),
        mean=tuple(processor.image_mean) if normalise else (0.0, 0.0, 0.0),
        std=tuple(processor.image_std) if normalise else (1.0, 1.0, 1.0),
    )  # fmt: skip
    config = model.config
    metric = config.model_type in METRIC_MODEL_TYPES or getattr(config, "depth_estimation_type", None) == "metric"

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        depth = model(pixel_values=pixels).predicted_depth
        return 1.0 / depth.clamp(min=1e-6) if metric else depth

    return Predictor(f"transformers:{type(model).__name__}", preprocessing, forward, model.device, model.dtype)


def _check_processor(processor: Any) -> None:
    """Refuse image-processor settings the batched preprocessing does not reproduce (it resizes bicubically,
    rescales by 1/255 and never pads), rather than predicting on differently prepared frames."""
    problems = []
    if getattr(processor, "do_resize", True) is False:
        problems.append("do_resize is off")
    if int(getattr(processor, "resample", 3)) != 3:
        problems.append(f"resample is {processor.resample}, not bicubic (3)")
    if getattr(processor, "do_rescale", True) and abs(float(getattr(processor, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        problems.append(f"rescale_factor is {processor.rescale_factor}, not 1/255")
    if getattr(processor, "do_pad", False):
        problems.append("do_pad is on")
    if problems:
        raise ModelError(f"the depth model's image processor ({type(processor).__name__}) has settings reelflow's "
                         f"depth preprocessing does not reproduce: {'; '.join(problems)}")  # fmt: skip


def _midas_predictor(model: Any) -> Predictor:
    arch = model.architecture
    side = int(arch.input_size)
    preprocessing = Preprocessing(size=(side, side), keep_aspect_ratio=True, multiple=MIDAS_MULTIPLE,
                                  mean=tuple(arch.mean), std=tuple(arch.std), resample="opencv")  # fmt: skip
    weight = next(model.parameters())
    return Predictor(f"midas:{model.architecture_name}", preprocessing, model, weight.device, weight.dtype)


def estimate(predictor: Predictor, frames: FrameArray, *, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Raw inverse depth of ``frames`` (uint8 ``(F, H, W, 3)``), ``batch_size`` frames at a time.

    Yields ``(start, depth)`` with ``depth`` float32 ``(b, H, W)`` for frames ``start .. start + b``;
    only one batch of frames is read at a time.
    """
    for start in range(0, frames.shape[0], batch_size):
        yield start, predictor(np.asarray(frames[start : start + batch_size]))


def normalise_depth(
    raw: FrameArray, out: Any, *, mode: Normalisation = "video", chunk_size: int = 16
) -> tuple[float, float]:
    """Write ``raw`` inverse depth ``(F, H, W)`` mapped to [0, 1] into ``out`` (same shape), a chunk at a time.

    ``video``: ``(d - min) / (max - min)`` with the clip's min and max (a first pass finds them), so a
    pixel's value moves only when its depth does. ``frame``: each frame's own min and max. A constant
    frame (or clip) maps to 0.

    Returns:
        The clip's raw (min, max).
    """
    count = raw.shape[0]
    low, high = depth_range(raw, chunk_size=chunk_size)
    for start in range(0, count, chunk_size):
        chunk = np.asarray(raw[start : start + chunk_size], np.float32)
        if mode == "video":
            lo, hi = np.float32(low), np.float32(high)
        else:
            lo, hi = chunk.min(axis=(1, 2), keepdims=True), chunk.max(axis=(1, 2), keepdims=True)
        span = hi - lo
        out[start : start + len(chunk)] = np.where(span > 0, (chunk - lo) / np.where(span > 0, span, 1), 0.0)
    return low, high


def depth_range(raw: FrameArray, *, chunk_size: int = 16) -> tuple[float, float]:
    """The (min, max) of ``raw`` ``(F, ...)``, read ``chunk_size`` frames at a time."""
    low, high = np.inf, -np.inf
    for start in range(0, raw.shape[0], chunk_size):
        chunk = np.asarray(raw[start : start + chunk_size])
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    return low, high
