"""The midas family: MiDaS v3.x DPT depth models (:mod:`reelflow.core.depth.midas`) from a directory.

``config.json`` is ``{"library": "midas", "architecture": "dpt_beit_large_512"}`` with optional
``model_args`` (fields of :class:`~reelflow.core.depth.midas.MidasArchitecture` to replace, for a
tiny model of the same layout). Weights are ``model.safetensors`` or the checkpoint as MiDaS
publishes it, one ``*.pt`` file read with ``torch.load(weights_only=True)``: tensors and plain
containers only, so a crafted pickle cannot run code. A directory holding nothing but a checkpoint
under its published name (``dpt_large_384.pt``, ``dpt_beit_large_512.pt``) needs no config: the
name is the architecture. Either way every key of the checkpoint must be used and none be missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reelflow.core.depth.midas import ARCHITECTURES
from reelflow.core.models.base import (
    ModelFamily,
    ModelSource,
    is_state_dict,
    read_checkpoint,
    no_component,
    prepare,
    read_json_file,
    read_root_config,
    torch_dtype,
)
from reelflow.schemas.errors import ModelError

LIBRARY = "midas"
SAFE_WEIGHTS, PICKLED_SUFFIX = "model.safetensors", ".pt"


class MidasFamily(ModelFamily):
    name = "midas"
    description = (
        'MiDaS DPT depth model: config.json ({"library": "midas", "architecture"}) with '
        "model.safetensors or the official *.pt loaded weights-only; or the official *.pt alone"
    )

    def recognises(self, root: Path) -> bool:
        config = read_root_config(root)
        if (root / "config.json").is_file():
            return "architecture" in config and config.get("library") == LIBRARY
        return _published_architecture(root) is not None

    def load(
        self,
        source: ModelSource,
        *,
        component: str | None = None,
        cls: type | None = None,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> Any:
        from reelflow.core.depth.midas import MidasDPT, load_midas_state_dict

        no_component(self.name, component, cls)
        root = source.directory(["config.json", SAFE_WEIGHTS, f"*{PICKLED_SUFFIX}"])
        architecture, model_args = _config(source, root)
        model = MidasDPT(architecture, model_args)
        load_midas_state_dict(model, state_dict(source, root))
        return prepare(model, device, torch_dtype(dtype))


def _pickled(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"*{PICKLED_SUFFIX}") if p.is_file())


def _published_architecture(root: Path) -> str | None:
    """The architecture a lone checkpoint's published file name gives, if that is all ``root`` has."""
    pickled = _pickled(root)
    if len(pickled) == 1 and pickled[0].stem in ARCHITECTURES:
        return pickled[0].stem
    return None


def _config(source: ModelSource, root: Path) -> tuple[str, dict[str, Any]]:
    path = root / "config.json"
    if not path.is_file():
        if (published := _published_architecture(root)) is not None:
            return published, {}
        raise ModelError(
            f"MiDaS model {source.model_id!r} has no config.json at {root}; write "
            '{"library": "midas", "architecture": NAME} beside its weights '
            f"(architectures: {', '.join(ARCHITECTURES)})"
        )
    config = read_json_file(path)
    model_args = config.get("model_args", {})
    if not isinstance(model_args, dict):
        raise ModelError(f"{path}: model_args must be an object, not {type(model_args).__name__}")
    return str(config.get("architecture")), model_args


def state_dict(source: ModelSource, root: Path) -> dict[str, torch.Tensor]:
    """The weights in ``root``: safetensors when present, else its one ``*.pt`` unpickled weights-only.

    A checkpoint saved with its optimizer (``{"model": ..., "optimizer": ...}``) gives its model
    part, as MiDaS's own loader does.

    Raises:
        ModelError: No weights file, several ``*.pt`` files, or one that holds more than a state dict.
    """
    loaded = read_checkpoint(root, SAFE_WEIGHTS, f"*{PICKLED_SUFFIX}", f"MiDaS model {source.model_id!r} needs its weights")
    if isinstance(loaded, dict) and "optimizer" in loaded and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not is_state_dict(loaded):
        raise ModelError(f"the checkpoint of {source.model_id!r} is not a state dict (a mapping of names to tensors)")
    return loaded
