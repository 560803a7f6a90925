"""The evaluation metrics of the video-editing papers (methods.md 6.2b), as plain functions of frames, masks, flows
and embeddings, each giving one value per frame (or per pair of neighbouring frames).

Frames are uint8 ``(F, H, W, 3)``; masks bool ``(F, H, W)`` (True: the edited region); embeddings
``(F, D)`` rows from the model's own projection (they are L2-normalised here, so any scale works).

- embedding metrics, cosines in [-1, 1] (papers often print them x100: the scale is stated, never applied):
  :func:`consecutive_consistency` (FateZero's Tem-Con, Gen-1's frame consistency: ``cos(e_i, e_{i+1})``
  per pair), :func:`all_pairs_consistency` (per frame, the mean cosine to every other frame),
  :func:`text_alignment` (Gen-1's prompt consistency, Videoshop's CLIP_tgt: ``cos(e_i, t)``),
  :func:`source_similarity` (Videoshop's CLIP_src: ``cos(e_i, s_i)`` with the source frame),
  :func:`frame_accuracy` (FateZero's Frame-Acc: 1 where the frame is at least as close to the target
  prompt as to the source prompt), :func:`subject_consistency` (VBench's, on DINO features: per frame
  after the first, the mean of its cosines to the first frame and to the previous one, each clamped at 0);
- pixel metrics: :func:`masked_psnr` and :func:`masked_ssim` over the pixels of a mask (inside or outside
  the edit), :func:`flicker` (mean absolute difference of neighbouring frames, in [0, 1]) and
  :func:`warp_error` (each frame against its successor warped back by the SOURCE's flow, squared error
  in [0, 1] over pixels the flow sees in both frames).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from reelflow.core.flow.warp import warp
from reelflow.core.metrics import PSNR_CAP_DB, ssim_map


def _unit(embeds: torch.Tensor | np.ndarray) -> torch.Tensor:
    return F.normalize(torch.as_tensor(embeds, dtype=torch.float64), dim=-1)


def consecutive_consistency(embeds: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(F-1,)``: cosine between each frame's embedding and the next one's."""
    e = _unit(embeds)
    return (e[1:] * e[:-1]).sum(-1).numpy()


def all_pairs_consistency(embeds: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(F,)``: each frame's mean cosine to every other frame (1 for a single frame); its mean is the mean over all
    pairs."""
    e = _unit(embeds)
    count = len(e)
    if count == 1:
        return np.ones(1)
    similarity = e @ e.T
    return ((similarity.sum(1) - similarity.diagonal()) / (count - 1)).numpy()


def text_alignment(embeds: torch.Tensor | np.ndarray, text: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(F,)``: cosine between each frame's embedding and the prompt's ``(D,)`` or ``(1, D)``."""
    return (_unit(embeds) @ _unit(text).reshape(-1)).numpy()


def source_similarity(embeds: torch.Tensor | np.ndarray, source: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(F,)``: cosine between each edited frame's embedding and its source frame's."""
    return (_unit(embeds) * _unit(source)).sum(-1).numpy()


def frame_accuracy(embeds: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
                   source: torch.Tensor | np.ndarray) -> np.ndarray:  # fmt: skip
    """``(F,)`` in {0, 1}: 1 where the frame is at least as close to the target prompt as to the source prompt (the
    softmax over the two prompts does not favour the source; a tie counts as a hit, as in FateZero's script)."""
    e = _unit(embeds)
    return ((e @ _unit(target).reshape(-1)) >= (e @ _unit(source).reshape(-1))).double().numpy()


def subject_consistency(features: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(F-1,)``: for each frame after the first, the mean of its cosine to the first frame and to the previous
    frame, each clamped at 0 (VBench's subject consistency, on DINO features)."""
    e = _unit(features)
    return (0.5 * ((e[1:] @ e[0]).clamp(min=0) + (e[1:] * e[:-1]).sum(-1).clamp(min=0))).numpy()


def masked_psnr(reference: np.ndarray, test: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(F,)`` PSNR in dB over the pixels of ``mask`` (all channels); capped at ``PSNR_CAP_DB`` where they are equal,
    NaN for a frame whose mask is empty."""
    _check(reference, test, mask)
    diff = (reference.astype(np.float64) - test.astype(np.float64)) ** 2
    weight = mask[..., None].astype(np.float64)
    pixels = weight.reshape(len(mask), -1).sum(1) * reference.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mse = (diff * weight).reshape(len(mask), -1).sum(1) / pixels
        values = 10.0 * np.log10(255.0**2 / mse)
    return np.where(pixels > 0, np.minimum(values, PSNR_CAP_DB), np.nan)


def masked_ssim(reference: np.ndarray, test: np.ndarray, mask: np.ndarray, *, window: int = 11) -> np.ndarray:
    """``(F,)`` mean of the SSIM map over the windows centred on pixels of ``mask``; NaN for a frame with none."""
    _check(reference, test, mask)
    values = ssim_map(reference, test, window=window).mean(1)  # (F, H - w + 1, W - w + 1), channels averaged
    half = window // 2
    centres = torch.from_numpy(mask[:, half : half + values.shape[1], half : half + values.shape[2]])
    counts = centres.reshape(len(mask), -1).sum(1).double()
    sums = (values * centres).reshape(len(mask), -1).sum(1)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan"))).numpy()


def flicker(frames: np.ndarray) -> np.ndarray:
    """``(F-1,)``: mean absolute difference between neighbouring frames, in [0, 1]."""
    x = frames.astype(np.float64) / 255.0
    return np.abs(x[1:] - x[:-1]).mean(axis=(1, 2, 3))


def warp_error(frames: np.ndarray, forward: np.ndarray, occluded: np.ndarray | None = None) -> np.ndarray:
    """``(F-1,)``: mean squared error, in [0, 1] units, between frame ``i`` and frame ``i+1`` warped back onto it by
    the forward flow ``(F-1, 2, H, W)`` (pixels; of the source, so the edit is held to the source's motion), over
    pixels whose match lies inside frame ``i+1`` and is not occluded (``(F-1, H, W)``, True: occluded); NaN where no
    pixel is left.

    Raises:
        ValueError: A flow of another frame count or size than the frames'.
    """
    expected = (len(frames) - 1, 2, *frames.shape[1:3])
    if tuple(np.shape(forward)) != expected:
        raise ValueError(f"the flow is {tuple(np.shape(forward))} but {len(frames)} frames of {frames.shape[2]}x"
                         f"{frames.shape[1]} need {expected}: estimate it on the source frames the edit was made from")  # fmt: skip
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).double() / 255.0
    warped, inside = warp(x[1:], torch.from_numpy(np.asarray(forward)).double())
    visible = inside if occluded is None else inside & ~torch.from_numpy(np.asarray(occluded, bool))
    weight = visible[:, None].double()
    counts = weight.flatten(1).sum(1) * x.shape[1]
    sums = ((warped - x[:-1]).square() * weight).flatten(1).sum(1)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan"))).numpy()


def _check(reference: np.ndarray, test: np.ndarray, mask: np.ndarray) -> None:
    if reference.shape != test.shape or mask.shape != reference.shape[:3]:
        raise ValueError(f"frames {reference.shape} and {test.shape} with masks {mask.shape}: the edit must keep the "
                         "source's frame count and size, and the masks be one per frame at that size")  # fmt: skip
