"""Load a stage's model component on this worker's device, through core's per-process cache."""

from __future__ import annotations

import threading
from typing import Any

import torch

from reelflow.core.models import load_component
from reelflow.schemas.calls import ResolvedModel
from reelflow.schemas.errors import ModelError
from reelflow.schemas.settings import Settings


_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.Lock:
    """One lock per cached model object: stages that swap its attention processors take turns."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(id(model), threading.Lock())


def resolve_device(settings: Settings) -> str:
    if settings.device != "auto":
        return settings.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(settings: Settings, device: str) -> str:
    if settings.dtype != "auto":
        return settings.dtype
    return "float16" if device == "cuda" else "float32"


def component(model: ResolvedModel | None, name: str, settings: Settings) -> Any:
    if model is None:
        raise ModelError(
            f"this stage needs a model for its {name} but its call names none; "
            "plan calls with flows.dag.plan_run, which resolves each stage's model from the spec's `models`"
        )
    return load_component(
        model.id,
        name,
        revision=model.revision,
        dtype=model.dtype,
        device=resolve_device(settings),
        cache_dir=settings.model_cache_dir,
    )
