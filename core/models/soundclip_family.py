"""The soundclip family: the CLIP-aligned audio encoders of Soundini and its predecessor
(:mod:`reelflow.core.audio.encoders`) from a directory.

``config.json`` is ``{"library": "soundclip", "architecture": "swin_tiny" | "resnet18"}`` with optional
``model_args`` (timm keyword arguments, for a tiny model of the same layout). Weights are
``model.safetensors`` or the checkpoint as the authors publish it, one ``*.pth`` (Soundini's
``tpami_encoder40.pth``, the predecessor's ``resnet18_57.pth``) read with
``torch.load(weights_only=True)``; a ``module.`` prefix left by DataParallel is dropped, as the
reference loader does. Every key must be used and none be missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reelflow.core.models.base import (
    ModelFamily,
    ModelSource,
    is_state_dict,
    no_component,
    prepare,
    read_checkpoint,
    read_json_file,
    read_root_config,
    torch_dtype,
)
from reelflow.schemas.errors import ModelError

LIBRARY = "soundclip"
SAFE_WEIGHTS, PICKLED_SUFFIX = "model.safetensors", ".pth"


class SoundclipFamily(ModelFamily):
    name = "soundclip"
    description = (
        'CLIP-aligned audio encoder (Soundini swin_tiny, CVPR 2022 resnet18): config.json ({"library": "soundclip", '
        '"architecture"}) with model.safetensors or the published *.pth loaded weights-only'
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
        from reelflow.core.audio.encoders import ARCHITECTURES, build_encoder

        no_component(self.name, component, cls)
        root = source.directory(["config.json", SAFE_WEIGHTS, f"*{PICKLED_SUFFIX}"])
        path = root / "config.json"
        if not path.is_file():
            raise ModelError(f"audio encoder {source.model_id!r} has no config.json at {root}; write "
                             f'{{"library": "soundclip", "architecture": NAME}} beside its weights '
                             f"(architectures: {', '.join(sorted(ARCHITECTURES))})")  # fmt: skip
        config = read_json_file(path)
        architecture, model_args = config.get("architecture"), config.get("model_args", {})
        if architecture not in ARCHITECTURES or not isinstance(model_args, dict):
            raise ModelError(f"{path} names architecture {architecture!r} (known: {', '.join(sorted(ARCHITECTURES))}) "
                             "and model_args must be an object of timm arguments")  # fmt: skip
        model = build_encoder(str(architecture), **model_args)
        weights = state_dict(source, root)
        missing, unexpected = sorted(set(model.state_dict()) - set(weights)), sorted(set(weights) - set(model.state_dict()))
        if missing or unexpected:
            raise ModelError(f"the weights of audio encoder {source.model_id!r} do not fit {architecture}: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}; check config.json's architecture")  # fmt: skip
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            raise ModelError(f"the weights of audio encoder {source.model_id!r} do not fit {architecture}: {exc}") from exc
        return prepare(model, device, torch_dtype(dtype))


def state_dict(source: ModelSource, root: Path) -> dict[str, torch.Tensor]:
    """The weights in ``root``: safetensors when present, else its one ``*.pth`` unpickled weights-only, without
    DataParallel's ``module.`` prefix.

    Raises:
        ModelError: No weights file, several ``*.pth`` files, or one that holds more than a state dict.
    """
    loaded = read_checkpoint(root, SAFE_WEIGHTS, f"*{PICKLED_SUFFIX}", f"audio encoder {source.model_id!r} needs its weights")
    if not is_state_dict(loaded):
        raise ModelError(f"the checkpoint of audio encoder {source.model_id!r} is not a state dict (names to tensors)")
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded = {k.removeprefix("module."): v for k, v in loaded.items()}
    return loaded
