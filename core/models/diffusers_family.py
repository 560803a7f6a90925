"""The diffusers family: a bundle whose components are subfolders, or one diffusers model.

A bundle's ``model_index.json`` maps each component to ``[library, class]``; the class is looked up
in diffusers (or one of its pipeline modules) or transformers only, so a config never picks the code
that runs. A caller may override the class, as Stable Diffusion callers do with ``DDIMScheduler``
for a bundle that ships another scheduler. A standalone model (a ControlNet, a bundle's ``unet/``)
has no index: its ``config.json`` names a diffusers class in ``_class_name``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from collections.abc import Callable
from typing import Any

import diffusers
import transformers
from diffusers import ModelMixin, SchedulerMixin
from transformers import PreTrainedModel

from reelflow.core.models.base import (
    ModelFamily,
    ModelSource,
    prepare,
    read_root_config,
    resolve_class,
    torch_dtype,
)
from reelflow.core.models.identity import FIX
from reelflow.schemas.errors import ModelError

_LIBRARIES: dict[str, ModuleType] = {"diffusers": diffusers, "transformers": transformers}


class DiffusersFamily(ModelFamily):
    name = "diffusers"
    libraries = (diffusers, transformers)
    description = (
        "diffusers bundle (model_index.json; a component is a subfolder) or one diffusers model "
        "(config.json with _class_name)"
    )

    def recognises(self, root: Path) -> bool:
        return (root / "model_index.json").is_file() or "_diffusers_version" in read_root_config(root)

    def load(
        self,
        source: ModelSource,
        *,
        component: str | None = None,
        cls: type | None = None,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> Any:
        target = _component_class(source, component, cls)
        where, kwargs = source.pretrained_args()
        if component is not None:
            kwargs["subfolder"] = component
        try:
            loaded = target.from_pretrained(where, **kwargs, **_weight_kwargs(target, dtype))
        except OSError as exc:
            raise ModelError(_load_failure(source, component, exc)) from exc
        return prepare(loaded, device)

    def handout(self, loaded: Any, reload: Callable[[], Any]) -> Any:
        # set_timesteps changes a scheduler in place, so each caller gets its own.
        if isinstance(loaded, SchedulerMixin):
            return type(loaded).from_config(loaded.config)
        return super().handout(loaded, reload)


def _component_class(source: ModelSource, component: str | None, cls: type | None) -> type:
    if cls is not None:
        return cls
    try:
        if component is None:
            return _standalone_class(source)
        return _indexed_class(source, component)
    except OSError as exc:
        raise ModelError(_load_failure(source, component, exc)) from exc


def _indexed_class(source: ModelSource, component: str) -> type:
    index = source.read_json("model_index.json")
    if index is None:
        raise ModelError(
            f"model {source.model_id!r} has no model_index.json, so it is not a diffusers bundle "
            f"and its {component!r} has no known class; pass the class, or {FIX}"
        )
    entries = {
        name: entry
        for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and all(entry)
    }
    if component not in entries:
        raise ModelError(
            f"unknown model component {component!r} of {source.model_id!r}; "
            f"valid: {', '.join(entries)}"
        )
    library, name = entries[component]
    return resolve_class(name, _libraries(library), f"model_index.json of {source.model_id!r}")


def _standalone_class(source: ModelSource) -> type:
    config = source.read_json("config.json") or {}
    name = config.get("_class_name")
    if not isinstance(name, str):
        raise ModelError(
            f"model {source.model_id!r} is neither a diffusers bundle nor a diffusers model "
            "(no model_index.json, no _class_name in config.json); name a component or pass the class"
        )
    return resolve_class(name, (diffusers,), f"config.json of {source.model_id!r}")


def _libraries(library: str) -> tuple[ModuleType, ...]:
    if library in _LIBRARIES:
        return (_LIBRARIES[library],)
    # Older bundles name a diffusers pipeline module ("stable_diffusion" for the safety checker).
    if library.isidentifier():
        try:
            return (importlib.import_module(f"diffusers.pipelines.{library}"),)
        except ImportError:
            pass
    raise ModelError(f"model_index.json names library {library!r}; only diffusers and transformers load")


def _weight_kwargs(target: type, dtype: str) -> dict[str, Any]:
    # Safetensors only: a pickled .bin can run code when loaded.
    if issubclass(target, ModelMixin):
        return {"torch_dtype": torch_dtype(dtype), "use_safetensors": True}
    if issubclass(target, PreTrainedModel):
        return {"dtype": torch_dtype(dtype), "use_safetensors": True}
    return {}  # schedulers, tokenizers, processors: no weights


def _load_failure(source: ModelSource, component: str | None, exc: OSError) -> str:
    cause = str(exc).rstrip(". ")
    what = "the model" if component is None else repr(component)
    if source.is_local:
        folder = "its root" if component is None else f"a {component}/ folder"
        fix = (
            f"check that it is a diffusers-layout bundle with {folder} holding config and "
            "safetensors weights; `reelflow models tiny DIR` writes a test bundle"
        )
    else:
        fix = FIX
    return f"cannot load {what} of model {source.model_id!r}: {cause}; {fix}"
