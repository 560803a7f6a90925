"""The timm family: a directory as timm's ``save_for_hf`` writes it, or a hub id (``hf-hub:org/name``).

``config.json`` holds ``architecture``, ``num_classes``, ``pretrained_cfg`` (input size,
normalisation) and, from recent timm, ``model_args`` (the factory arguments the weights were
trained with). The model is made by ``timm.create_model(architecture, pretrained=True)`` with the
weights file given through ``pretrained_cfg_overlay``, so timm's own loading (and its checkpoint
filters) runs, and only ``model.safetensors`` is read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from reelflow.core.models.base import (
    ModelFamily,
    ModelSource,
    no_component,
    prepare,
    read_json_file,
    read_root_config,
    torch_dtype,
)
from reelflow.schemas.errors import ModelError

WEIGHTS = "model.safetensors"
# Keys of a saved pretrained_cfg that point at another weight source; the local file replaces them.
_SOURCE_KEYS = ("source", "hf_hub_id", "hf_hub_filename", "url", "state_dict")


class TimmFamily(ModelFamily):
    name = "timm"
    description = (
        "timm model: config.json (architecture, num_classes, pretrained_cfg) and model.safetensors; "
        "hub ids as hf-hub:org/name"
    )

    def recognises(self, root: Path) -> bool:
        config = read_root_config(root)
        return "architecture" in config and "pretrained_cfg" in config

    def load(
        self,
        source: ModelSource,
        *,
        component: str | None = None,
        cls: type | None = None,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> Any:
        # timm takes about a second to import; only processes that load a timm model pay for it.
        import timm

        no_component(self.name, component, cls)
        root = source.directory(["config.json", WEIGHTS])
        config, weights = _files(source, root)
        architecture = config["architecture"]
        if not timm.is_model(architecture):
            raise ModelError(
                f"model {source.model_id!r} names timm architecture {architecture!r}, which this "
                f"timm {timm.__version__} does not have; upgrade timm or fix config.json"
            )
        try:
            model = timm.create_model(
                architecture,
                pretrained=True,
                pretrained_cfg_overlay=_overlay(config, weights),
                **config.get("model_args", {}),
            )
        except (RuntimeError, TypeError) as exc:  # state-dict mismatch, unknown model argument
            raise ModelError(
                f"cannot build timm model {source.model_id!r} from its config and weights: {exc}"
            ) from exc
        return prepare(model, device, torch_dtype(dtype))


def _files(source: ModelSource, root: Path) -> tuple[dict[str, Any], Path]:
    config_path, weights = root / "config.json", root / WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        raise ModelError(
            f"timm model {source.model_id!r} needs config.json and {WEIGHTS} at {root}; "
            "write them with timm.models.save_for_hf(model, dir, safe_serialization=True)"
        )
    config = read_json_file(config_path)
    if not isinstance(config.get("architecture"), str):
        raise ModelError(f"timm config {config_path} names no architecture")
    return config, weights


def _overlay(config: dict[str, Any], weights: Path) -> dict[str, Any]:
    import timm.models

    # create_model applies the overlay with dataclasses.replace, which refuses unknown keys, and a
    # config written by another timm version may carry some.
    known = {field.name for field in dataclasses.fields(timm.models.PretrainedCfg)}
    overlay = {
        key: value
        for key, value in config.get("pretrained_cfg", {}).items()
        if key in known and key not in _SOURCE_KEYS
    }
    if "num_classes" in config:
        overlay["num_classes"] = config["num_classes"]
    return overlay | {"file": str(weights), "custom_load": False}
