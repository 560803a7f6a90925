"""Soundini's guidance losses (Lee et al. 2023, "Soundini: Sound-Guided Diffusion for Natural Video Editing";
methods.md 5.5), as plain differentiable functions of the current estimate of the frames.

Notation: ``x`` frames ``(F, C, H, W)`` in [-1, 1] (the denoised estimate the losses see), ``mask``
``(F, 1, H, W)`` in {0, 1} (1: the region to edit), ``image`` and ``audio`` embeddings ``(F, D)``
in the shared CLIP space, ``forward``/``backward`` flow ``(F-1, 2, H, W)`` between neighbouring
frames (:mod:`reelflow.core.flow.warp` for the convention).

Each returns one term per frame (or per neighbouring pair), ``(F,)`` or ``(F-1,)``, each a mean over
that frame's own pixels; the sampler sums the terms of the frames it guides, so a frame is pulled
as hard whichever chunk it falls in.

- :func:`sound_loss`, L_SG: ``1 - cos(E_I(M_i x_i), E_A(a_i))`` per row (the caller embeds the masked,
  augmented frames and averages a frame's views);
- :func:`direction_loss`, L_DSG: ``1 - cos(e_I(x_{i+1}) - e_I(x_i), e_A(a_{i+1}) - e_A(a_i))`` per pair, on
  unit-length embeddings ``e``: the change of look follows the change of sound; a pair whose sound
  does not change asks for nothing;
- :func:`flow_loss`: each frame warped onto its neighbour by the flow between them, squared error
  inside the mask, both ways; pixels the flow marks occluded are left out (the prototype keeps them,
  and so penalises what cannot match);
- :func:`background_l1`: mean absolute difference from the source outside the mask;
- :func:`range_loss`: ``mean (x - clamp(x, -1, 1))^2``;
- :func:`ramp`: the weight of the flow and background terms, from ~0 at the first step to 1 after
  ``steps`` steps (the prototype's ``min(1, (T_eff - t) / 50)``: half of its 100 steps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reelflow.core.flow.warp import warp

RAMP_STEPS = 50


def ramp(step: int, steps: int = RAMP_STEPS) -> float:
    """Weight at denoising step ``step`` (0 first): ``min(1, (step + 1) / steps)``."""
    return min(1.0, (step + 1) / steps)


def sound_loss(image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """L_SG per row, ``(n,)``: cosine distance between an image embedding and its frame's audio embedding."""
    return 1.0 - F.cosine_similarity(image, audio.to(image), dim=-1)


def direction_loss(image: torch.Tensor, audio: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L_DSG per pair of neighbouring frames, ``(F-1,)``: cosine distance between the change of unit image embedding
    and the change of unit audio embedding; zero for a pair whose sound does not change."""
    image, audio = F.normalize(image, dim=-1), F.normalize(audio.to(image), dim=-1)
    d_image, d_audio = image[1:] - image[:-1], audio[1:] - audio[:-1]
    moving = (d_audio.norm(dim=-1) > eps).to(image)
    return moving * (1.0 - F.cosine_similarity(d_image, d_audio, dim=-1, eps=eps))


def flow_loss(
    x: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, mask: torch.Tensor, occluded_forward: torch.Tensor | None = None,
    occluded_backward: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Per pair of neighbouring frames, ``(F-1,)``: squared error between each frame and its neighbour warped onto
    it, inside the mask, both ways, ``|M_i (W(x_{i+1}, f_{i->i+1}) - x_i)|^2 + |M_{i+1} (W(x_i, f_{i+1->i}) - x_{i+1})|^2``,
    averaged over pixels; occluded pixels (``(F-1, H, W)``, True: occluded) and samples from outside the frame count
    for nothing."""
    if x.shape[0] < 2:
        return x.new_zeros(0)
    onto_first, inside_first = warp(x[1:], forward)
    onto_second, inside_second = warp(x[:-1], backward)
    keep_first = mask[:-1] * _visible(inside_first, occluded_forward)
    keep_second = mask[1:] * _visible(inside_second, occluded_backward)
    first = (keep_first * (onto_first - x[:-1])).square().flatten(1).mean(1)
    second = (keep_second * (onto_second - x[1:])).square().flatten(1).mean(1)
    return first + second


def _visible(inside: torch.Tensor, occluded: torch.Tensor | None) -> torch.Tensor:
    visible = inside if occluded is None else inside & ~occluded.to(inside.device)
    return visible.unsqueeze(1).float()


def background_l1(x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per frame, ``(F,)``: mean absolute difference from the source outside the mask."""
    return ((1.0 - mask) * (x - source.to(x))).abs().flatten(1).mean(1)


def range_loss(x: torch.Tensor) -> torch.Tensor:
    """Per frame, ``(F,)``: how far the estimate strays outside [-1, 1], ``mean (x - clamp(x, -1, 1))^2``."""
    return (x - x.clamp(-1.0, 1.0)).square().flatten(1).mean(1)
