"""The torchvision family: an architecture from ``torchvision.models`` with weights from a directory.

``config.json`` is ``{"library": "torchvision", "architecture": "raft_small"}`` with optional
``model_args`` for the builder. Weights are ``model.safetensors`` or, where only the checkpoint
torchvision publishes exists, ``model.pth`` read with ``torch.load(weights_only=True)``: tensors
and plain containers only, so a crafted pickle cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision.models
from safetensors.torch import load_file

from reelflow.core.models.base import (
    ModelFamily,
    ModelSource,
    is_state_dict,
    load_pickled_weights,
    no_component,
    prepare,
    read_json_file,
    read_root_config,
    torch_dtype,
)
from reelflow.schemas.errors import ModelError

LIBRARY = "torchvision"
SAFE_WEIGHTS, PICKLED_WEIGHTS = "model.safetensors", "model.pth"


class TorchvisionFamily(ModelFamily):
    name = "torchvision"
    description = (
        'torchvision architecture named in config.json ({"architecture", "library": "torchvision"}) '
        "with model.safetensors, or model.pth loaded weights-only"
    )

    def recognises(self, root: Path) -> bool:
        config = read_root_config(root)
        return "architecture" in config and config.get("library") == LIBRARY

    def load(
        self,
        source: ModelSource,
        *,
        component: str | None = None,
        cls: type | None = None,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> Any:
        no_component(self.name, component, cls)
        root = source.directory(["config.json", SAFE_WEIGHTS, PICKLED_WEIGHTS])
        config = _config(source, root)
        model = torchvision.models.get_model(
            config["architecture"], weights=None, **config.get("model_args", {})
        )
        try:
            model.load_state_dict(state_dict(source, root))
        except RuntimeError as exc:
            raise ModelError(
                f"the weights of torchvision model {source.model_id!r} do not fit "
                f"{config['architecture']}: {exc}"
            ) from exc
        return prepare(model, device, torch_dtype(dtype))


def _config(source: ModelSource, root: Path) -> dict[str, Any]:
    path = root / "config.json"
    if not path.is_file():
        raise ModelError(
            f"torchvision model {source.model_id!r} has no config.json at {root}; write "
            '{"library": "torchvision", "architecture": NAME} beside its weights'
        )
    config = read_json_file(path)
    architecture = config.get("architecture")
    if architecture not in torchvision.models.list_models():
        raise ModelError(
            f"{path} names architecture {architecture!r}, which torchvision does not have; "
            "see torchvision.models.list_models()"
        )
    return config


def state_dict(source: ModelSource, root: Path) -> dict[str, torch.Tensor]:
    """The weights in ``root``: safetensors when present, else a ``.pth`` unpickled weights-only.

    Raises:
        ModelError: No weights file, or a ``.pth`` that holds more than tensors.
    """
    if (root / SAFE_WEIGHTS).is_file():
        return load_file(root / SAFE_WEIGHTS)
    path = root / PICKLED_WEIGHTS
    if not path.is_file():
        raise ModelError(f"torchvision model {source.model_id!r} has no {SAFE_WEIGHTS} or {PICKLED_WEIGHTS}")
    loaded = load_pickled_weights(path)
    if not is_state_dict(loaded):
        raise ModelError(f"{path} is not a state dict (a mapping of names to tensors)")
    return loaded
