"""Gen-1's temporal guidance: content guidance between per-frame predictions, plus a push toward the
prediction that sees the other frames.

Gen-1 (Esser et al. 2023, §3.4; methods.md 3.5) runs one network in two modes: as an image model,
each frame on its own (``mu_pi``), and as a video model, frames attending to each other (``mu``).
Sampling combines three predictions, each conditioned on the same structure ``s``:

    mu~ = mu_pi(z, 0, s) + omega * (mu_pi(z, c, s) - mu_pi(z, 0, s)) + omega_t * (mu(z, c, s) - mu_pi(z, c, s))

``omega`` is the content (classifier-free) guidance; ``omega_t = 0`` edits frame by frame,
``omega_t = 1`` is the plain video model (with ``omega = 1``, exactly its conditional prediction),
``omega_t > 1`` smooths more. Here the image mode is an image UNet with per-frame self-attention and
the video mode the same UNet with cross-frame self-attention (core.attention.processor).

Notation: ``uncond`` = ``mu_pi(z, 0, s)``, ``image`` = ``mu_pi(z, c, s)``, ``video`` = ``mu(z, c, s)``,
all ``(F, C, h, w)``; ``omega`` = content scale, ``omega_t`` = temporal scale.
"""

from __future__ import annotations

import torch


def temporal_guidance(
    uncond: torch.Tensor, image: torch.Tensor, video: torch.Tensor, *, omega: float, omega_t: float
) -> torch.Tensor:
    """``uncond + omega * (image - uncond) + omega_t * (video - image)``, Gen-1's guided prediction."""
    return uncond + omega * (image - uncond) + omega_t * (video - image)
