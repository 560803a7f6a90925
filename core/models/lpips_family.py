"""The lpips family: the LPIPS v0.1 VGG16 perceptual distance (:mod:`reelflow.core.guidance.lpips`) from a
directory holding its two published parts side by side:

- ``config.json``: ``{"library": "lpips", "net": "vgg", "version": "0.1"}`` (``version`` may be left out);
- the trunk: ``backbone.safetensors``, else one ``vgg16*.pth``, torchvision's ImageNet checkpoint under its
  published name (``vgg16-397923af.pth``, the whole network's state dict; ``classifier.*`` is ignored);
- the linear layers: ``lin.safetensors``, else ``vgg.pth``, the file the lpips package ships as
  ``lpips/weights/v0.1/vgg.pth`` (``lin0.model.1.weight`` ... ``lin4.model.1.weight``).

A safetensors file carries the same keys as the pickle it stands for and wins when both are present. A
pickle is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a crafted file
cannot run code. Every key must be used and none be missing. Nothing is downloaded: lpips' own
loader fetches the trunk from torchvision's servers, this one reads only the directory (or its hub snapshot).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reelflow.core.models.base import (
    ModelFamily,
    ModelSource,
    find_checkpoint,
    is_state_dict,
    no_component,
    prepare,
    read_json_file,
    read_root_config,
    read_weights,
    torch_dtype,
)
from reelflow.schemas.errors import ModelError

LIBRARY = "lpips"
CONFIG = {"library": LIBRARY, "net": "vgg", "version": "0.1"}
BACKBONE_SAFE, BACKBONE_PICKLED = "backbone.safetensors", "vgg16*.pth"
LIN_SAFE, LIN_PICKLED = "lin.safetensors", "vgg.pth"
PUBLISHED_BACKBONE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1


class LpipsFamily(ModelFamily):
    name = "lpips"
    description = (
        'LPIPS v0.1 perceptual distance on VGG16: config.json ({"library": "lpips", "net": "vgg", "version": "0.1"}) '
        "with torchvision's vgg16-397923af.pth (or backbone.safetensors) and lpips' vgg.pth (or lin.safetensors), "
        "pickles loaded weights-only"
    )

    def recognises(self, root: Path) -> bool:
        return read_root_config(root).get("library") == LIBRARY

    def load(
        self,
        source: ModelSource,
        *,
        component: str | None = None,
        cls: type | None = None,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> Any:
        from reelflow.core.guidance.lpips import LpipsVgg, lpips_state_dict

        no_component(self.name, component, cls)
        root = source.directory(["config.json", BACKBONE_SAFE, BACKBONE_PICKLED, LIN_SAFE, LIN_PICKLED])
        check_config(source, root)
        backbone, backbone_file = read_part(source, root, BACKBONE_SAFE, BACKBONE_PICKLED, "the VGG16 trunk",
                                            f"torchvision's ImageNet checkpoint, {PUBLISHED_BACKBONE}")  # fmt: skip
        lin, lin_file = read_part(source, root, LIN_SAFE, LIN_PICKLED, "the linear layers",
                                  "the lpips package's lpips/weights/v0.1/vgg.pth")  # fmt: skip
        model = LpipsVgg()
        model.load_state_dict(lpips_state_dict(backbone, lin, backbone_file=backbone_file, lin_file=lin_file))
        return prepare(model, device, torch_dtype(dtype))


def check_config(source: ModelSource, root: Path) -> None:
    """Refuse a directory whose ``config.json`` is missing or names another network or version than :data:`CONFIG`.

    Raises:
        ModelError: The message shows the config to write.
    """
    path = root / "config.json"
    if not path.is_file():
        raise ModelError(f"LPIPS model {source.model_id!r} has no config.json at {root}; write "
                         f"{json.dumps(CONFIG)} beside its weights")  # fmt: skip
    config = read_json_file(path)
    if (config.get("net"), str(config.get("version", "0.1"))) != (CONFIG["net"], CONFIG["version"]):
        raise ModelError(f"{path} asks for LPIPS net {config.get('net')!r}, version {config.get('version')!r}; only "
                         f"{json.dumps(CONFIG)} (VGG16, v0.1) is implemented")  # fmt: skip


def read_part(
    source: ModelSource, root: Path, safe_name: str, pattern: str, what: str, origin: str
) -> tuple[dict[str, Any], str]:
    """One part's state dict from ``root`` and the path it came from (:func:`find_checkpoint`; a pickle is read
    weights-only onto the CPU: lpips ships its vgg.pth as CUDA tensors).

    ``what`` names the part and ``origin`` where its published file comes from, for messages.

    Raises:
        ModelError: No such file, several matches, or a file that holds more than a state dict.
    """
    path = find_checkpoint(root, safe_name, pattern, f"LPIPS model {source.model_id!r} needs {what}", origin)
    loaded = read_weights(path)
    if not is_state_dict(loaded):
        raise ModelError(f"{path} is not a state dict (names to tensors); it should hold {what} as {origin} does")
    return loaded, str(path)
