"""Frame geometry and value ranges: plan a resize, apply it, and map uint8 frames to model range.

A resize keeps the aspect ratio. ``crop`` scales to cover the output and cuts the centre out;
``pad`` scales to fit inside it and centres the picture on black. Output sides are multiples of
``multiple`` (8 for a VAE with a downsampling factor of 8, 64 for some UNets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Fit = Literal["crop", "pad"]

_CHUNK = 16
"""Frames per interpolation call: keeps the float32 copy of a long 1080p clip out of memory."""


@dataclass(frozen=True)
class ResizePlan:
    """Scale to ``(scaled_w, scaled_h)``, then crop or pad to ``(out_w, out_h)``.

    Along an axis where the scaled side exceeds the output, the offset is where the crop window
    starts in the scaled image; where it falls short, where the scaled image starts in the
    output canvas.
    """

    scaled_w: int
    scaled_h: int
    out_w: int
    out_h: int
    offset_x: int
    offset_y: int


def _check_multiple(name: str, value: int, multiple: int) -> None:
    if value < 1:
        raise ValueError(f"{name} {value} must be >= 1")
    if value % multiple:
        below, above = value // multiple * multiple, (value // multiple + 1) * multiple
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ValueError(f"{name} {value} is not a multiple of {multiple}; use {nearest}")


def _to_multiple(size: float, multiple: int, fit: Fit) -> int:
    """Round ``size`` down (crop) or up (pad) to a multiple, never to zero."""
    steps = math.floor(size / multiple) if fit == "crop" else math.ceil(size / multiple)
    return max(1, steps) * multiple


def _fit_into(src_w: int, src_h: int, out_w: int, out_h: int, fit: Fit) -> ResizePlan:
    if fit == "crop":
        scale = max(out_w / src_w, out_h / src_h)
        scaled_w, scaled_h = max(out_w, round(src_w * scale)), max(out_h, round(src_h * scale))
    else:
        scale = min(out_w / src_w, out_h / src_h)
        scaled_w = min(out_w, max(1, round(src_w * scale)))
        scaled_h = min(out_h, max(1, round(src_h * scale)))
    return _centred(scaled_w, scaled_h, out_w, out_h)


def centred_plan(scaled_w: int, scaled_h: int, out_w: int, out_h: int) -> ResizePlan:
    """The plan that scales to ``(scaled_w, scaled_h)`` and crops or pads to ``(out_w, out_h)`` about the centre: every
    plan :func:`plan_resize` makes, rebuilt from the sizes a decoded artifact records."""
    return _centred(scaled_w, scaled_h, out_w, out_h)


def _centred(scaled_w: int, scaled_h: int, out_w: int, out_h: int) -> ResizePlan:
    offset_x, offset_y = abs(scaled_w - out_w) // 2, abs(scaled_h - out_h) // 2
    return ResizePlan(scaled_w, scaled_h, out_w, out_h, offset_x, offset_y)


def plan_resize(
    src_w: int,
    src_h: int,
    *,
    width: int | None,
    height: int | None,
    fit: Fit,
    multiple: int,
) -> ResizePlan:
    """Plan how ``(src_w, src_h)`` frames become ``(out_w, out_h)`` frames.

    Both sides given: the output is exactly ``(width, height)``. One side given: the other
    follows the source aspect ratio, rounded to ``multiple`` (down for crop, up for pad). None
    given: the source size rounded the same way, without scaling.
    """
    if src_w < 1 or src_h < 1 or multiple < 1:
        raise ValueError(f"source {src_w}x{src_h} and multiple {multiple} must all be >= 1")
    if fit not in ("crop", "pad"):
        raise ValueError(f"fit {fit!r} is unknown; use 'crop' or 'pad'")
    for name, value in (("width", width), ("height", height)):
        if value is not None:
            _check_multiple(name, value, multiple)
    if width is None and height is None:
        out_w, out_h = _to_multiple(src_w, multiple, fit), _to_multiple(src_h, multiple, fit)
        if fit == "pad" or (out_w <= src_w and out_h <= src_h):
            return _centred(src_w, src_h, out_w, out_h)
        # A source smaller than one multiple cannot be cropped to it; scale up to cover.
        return _fit_into(src_w, src_h, out_w, out_h, fit)
    if height is None:
        height = _to_multiple(width * src_h / src_w, multiple, fit)
    if width is None:
        width = _to_multiple(height * src_w / src_h, multiple, fit)
    return _fit_into(src_w, src_h, width, height, fit)


def _place(frames: np.ndarray, plan: ResizePlan) -> np.ndarray:
    """Crop or pad scaled ``(F, scaled_h, scaled_w, 3)`` frames to ``(F, out_h, out_w, 3)``."""
    out = np.zeros((len(frames), plan.out_h, plan.out_w, 3), np.uint8)
    src, dst = [slice(None)], [slice(None)]
    for scaled, size, offset in (
        (plan.scaled_h, plan.out_h, plan.offset_y),
        (plan.scaled_w, plan.out_w, plan.offset_x),
    ):
        window = slice(offset, offset + min(scaled, size))
        src.append(window if scaled >= size else slice(None))
        dst.append(slice(None) if scaled >= size else window)
    out[tuple(dst)] = frames[tuple(src)]
    return out


def _scale(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of uint8 ``(F, H, W, 3)`` to ``(F, height, width, 3)``."""
    src_h, src_w = frames.shape[1:3]
    if (src_w, src_h) == (width, height):
        return frames
    antialias = width < src_w or height < src_h
    chunks = []
    for start in range(0, len(frames), _CHUNK):
        x = torch.from_numpy(frames[start : start + _CHUNK]).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=antialias)
        chunks.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(chunks)


def resize_frames(frames: np.ndarray, plan: ResizePlan) -> np.ndarray:
    """Apply ``plan`` to ``frames`` (uint8 ``(F, H, W, 3)``); returns uint8 ``(F, out_h, out_w, 3)``."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 of shape (F, H, W, 3), got {frames.dtype} {frames.shape}")
    return _place(_scale(frames, plan.scaled_w, plan.scaled_h), plan)


def to_model_range(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(F, H, W, 3)`` -> ``torch.Tensor`` float32 ``(F, 3, H, W)`` in [-1, 1]."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 of shape (F, H, W, 3), got {frames.dtype} {frames.shape}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    return (x / 127.5 - 1.0).contiguous()


def from_model_range(t: torch.Tensor) -> np.ndarray:
    """float ``(F, 3, H, W)`` in [-1, 1] -> uint8 ``(F, H, W, 3)``; the inverse of :func:`to_model_range`."""
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"expected a tensor of shape (F, 3, H, W), got {tuple(t.shape)}")
    x = (t.detach().float().clamp(-1.0, 1.0) * 127.5 + 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
