"""Array layout policy: chunk along frames, store float16 where it is lossless enough."""

from __future__ import annotations

import math

import numpy as np

FLOAT16_MAX = float(np.finfo(np.float16).max)
_CHUNK_TARGET_BYTES = 1 << 20


def frame_chunks(shape: tuple[int, ...], itemsize: int, target_bytes: int = _CHUNK_TARGET_BYTES) -> tuple[int, ...]:
    """Chunks that split only the leading (frame) axis, about ``target_bytes`` each and never empty."""
    if not shape:
        return ()
    per_frame = max(1, math.prod(shape[1:]) * itemsize)
    frames = max(1, min(shape[0], target_bytes // per_frame))
    return (frames, *shape[1:])


def storage_dtype(array: np.ndarray, rtol: float = 1e-3) -> np.dtype:
    """float16 when every value fits and the round trip stays within ``rtol`` of the array's scale, else the input dtype.

    Latents and attention probabilities pass (their scale is ~1); values past float16's range or
    arrays whose detail lives far below their scale keep their own dtype.
    """
    if array.dtype.kind != "f" or array.dtype == np.float16 or array.size == 0:
        return array.dtype
    if not np.isfinite(array).all() or np.abs(array).max() > FLOAT16_MAX:
        return array.dtype
    scale = float(np.abs(array).max()) or 1.0
    error = float(np.abs(array.astype(np.float16).astype(array.dtype) - array).max())
    return np.dtype(np.float16) if error <= rtol * scale else array.dtype
