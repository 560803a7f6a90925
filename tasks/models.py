"""Load a stage's model component on this worker's device, through core's per-process cache."""

from __future__ import annotations

import threading
from typing import Any

import torch

from reelflow.core.models import load_model, read_model_json
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


def load_role(model: ResolvedModel | None, role: str, component: str | None, settings: Settings, **options: Any) -> Any:
    """Load the model planned for ``role`` (or one ``component`` of it: for a diffusers bundle a subfolder,
    by default the role's own name) on this worker's device, exactly as fingerprinted when the run was
    planned. ``options`` go to :func:`~reelflow.core.models.load_model` (e.g. ``cls="DDIMScheduler"``)."""
    if model is None:
        raise ModelError(
            f"this stage needs a model as its {role} but its call names none; "
            "plan calls with flows.dag.plan_run, which resolves each stage's roles from the spec's `models`"
        )
    if model.bundle and component is None:
        component = role  # a bundle's subfolder is named like the role (unet, vae, text_encoder)
    return load_model(
        model.id,
        family=model.family,
        component=component,
        revision=model.revision,
        dtype=model.dtype,
        device=resolve_device(settings),
        cache_dir=settings.model_cache_dir,
        fingerprint=model.fingerprint,
        weight_name=model.weight_name,
        **({"offload": model.offload} if model.offload != "none" else {}),
        **options,
    )


def role_json(
    models: dict[str, ResolvedModel], role: str, component: str | None, name: str, settings: Settings, stage: str
) -> dict[str, Any] | None:
    """The JSON file ``name`` of the model planned for ``role``, read without loading weights.

    A diffusers bundle's file is ``<component>/<name>``, the component defaulting to the role's name
    (``unet/config.json``; ``component=""`` reads the bundle's own, ``model_index.json``); any other model's is
    ``<name>`` at its root, or under ``component`` when given. None when the model has no such file.

    Raises:
        ModelError: The stage has no model for ``role``, or the model's files changed since planning.
    """
    model = models.get(role)
    if model is None:
        raise ModelError(f"stage {stage!r} has no model as its {role}; its roles: {', '.join(models) or 'none'}")
    folder = (role if component is None else component) if model.bundle else component  # "": the bundle's root
    path = f"{folder}/{name}" if folder else name
    return read_model_json(model.id, path, revision=model.revision, cache_dir=settings.model_cache_dir,
                           fingerprint=model.fingerprint)  # fmt: skip
