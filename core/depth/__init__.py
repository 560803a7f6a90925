"""Monocular depth: models that map frames to relative inverse depth.

:mod:`reelflow.core.depth.midas` holds MiDaS v3.x DPT models over timm backbones that load the
official checkpoints by their own state-dict layout.
"""

from __future__ import annotations

from reelflow.core.depth.midas import (
    ARCHITECTURES,
    MidasArchitecture,
    MidasDPT,
    load_midas_state_dict,
    midas_state_dict,
    resolve_architecture,
)

__all__ = [
    "ARCHITECTURES",
    "MidasArchitecture",
    "MidasDPT",
    "load_midas_state_dict",
    "midas_state_dict",
    "resolve_architecture",
]
