"""The ip_adapter family: an IP-Adapter (Ye et al. 2023) laid out as its authors publish it (h94/IP-Adapter).

A repo holds several adapters side by side, so the model names one file, ``weight_name``
(``models/ip-adapter_sd15.safetensors``). Beside it, ``image_encoder/`` holds the CLIP vision model
with projection whose image embedding the adapter was trained on. Components:

- None: the adapter's weights, :class:`IPAdapterWeights` (safetensors only: a pickled ``.bin`` can
  run code when loaded);
- ``image_encoder``: ``CLIPVisionModelWithProjection`` from ``image_encoder/``;
- ``feature_extractor``: its ``CLIPImageProcessor``: CLIP's defaults at the encoder's input size, as
  diffusers' ``load_ip_adapter`` builds it.

Only the original adapter layout (a linear projection of the pooled image embedding to a few
tokens: ``ip-adapter_sd15``, ``ip-adapter_sd15_light``) is read; the Plus and Face variants project
CLIP's hidden states through a resampler and are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import load_file

from reelflow.core.models.base import ModelFamily, ModelSource, prepare, read_json_file, torch_dtype
from reelflow.schemas.errors import ModelError

ENCODER = "image_encoder"
COMPONENTS = (ENCODER, "feature_extractor")


@dataclass(frozen=True)
class IPAdapterWeights:
    """One adapter: the image projection (``proj.weight``, ``proj.bias``, ``norm.*``) and the key and value
    projections of each cross-attention layer in UNet order (``to_k_ip``, ``to_v_ip`` per layer)."""

    image_proj: dict[str, torch.Tensor]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def cross_attention_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    @property
    def image_embed_dim(self) -> int:
        return int(self.image_proj["proj.weight"].shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.image_proj["proj.weight"].shape[0]) // self.cross_attention_dim

    def to(self, device: str, dtype: torch.dtype) -> IPAdapterWeights:
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return IPAdapterWeights({k: move(v) for k, v in self.image_proj.items()}, [(move(k), move(v)) for k, v in self.layers])


class IPAdapterFamily(ModelFamily):
    name = "ip_adapter"
    takes_weight_name = True
    description = (
        "IP-Adapter as h94/IP-Adapter publishes it: weight_name names the adapter's safetensors file "
        "(models/ip-adapter_sd15.safetensors), image_encoder/ beside it the CLIP vision model"
    )

    def recognises(self, root: Path) -> bool:
        return any(path.parent.joinpath(ENCODER, "config.json").is_file() for path in _adapter_files(root))

    def load(
        self,
        source: ModelSource,
        *,
        component: str | None = None,
        cls: type | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        weight_name: str | None = None,
    ) -> Any:
        if cls is not None or component not in (None, *COMPONENTS):
            raise ModelError(f"an IP-Adapter's components are {', '.join(COMPONENTS)} (or none, for its weights); "
                             f"got component {component!r}" + (" and a class override" if cls is not None else ""))  # fmt: skip
        encoder = str(PurePosixPath(str(weight_name)).parent / ENCODER)  # load_model checked it is given
        if component is None:
            path = source.directory([weight_name]) / weight_name
            return read_adapter(path, source.model_id).to(device, torch_dtype(dtype))
        root = source.directory([f"{encoder}/*.json", f"{encoder}/*.safetensors"])  # not the pickled copy beside it
        if component == ENCODER:
            return _encoder(root / encoder, source.model_id, dtype, device)
        return _processor(root / encoder)


def read_adapter(path: Path, model_id: str = "") -> IPAdapterWeights:
    """The adapter in the safetensors file at ``path`` (keys ``image_proj.*`` and ``ip_adapter.<n>.to_{k,v}_ip.weight``).

    Raises:
        ModelError: Not a safetensors file, not the original adapter layout, or layers missing.
    """
    where = f"{path.name} of {model_id!r}" if model_id else str(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"IP-Adapter weights are read from safetensors only ({where} is not): a pickled checkpoint "
                         "can run code when loaded; use the .safetensors file the repo publishes beside it")  # fmt: skip
    if not path.is_file():
        raise ModelError(f"IP-Adapter {model_id!r} has no {path.name}; check the model's `weight_name`")
    state = load_file(path)
    image_proj = {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")}
    adapter = {k.removeprefix("ip_adapter."): v for k, v in state.items() if k.startswith("ip_adapter.")}
    if set(image_proj) != {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
        variant = "a Plus or Face adapter (a resampler over CLIP's hidden states)" if image_proj else "no image projection"
        raise ModelError(f"{where} is {variant}; reelflow reads the original IP-Adapter layout (ip-adapter_sd15, "
                         "ip-adapter_sd15_light), whose image projection is one linear layer and a norm")  # fmt: skip
    count = len(adapter) // 2  # cross-attention layers are numbered 1, 3, 5, ...: every attention layer, cross odd
    layers = []
    for n in range(1, 2 * count, 2):
        try:
            layers.append((adapter[f"{n}.to_k_ip.weight"], adapter[f"{n}.to_v_ip.weight"]))
        except KeyError as exc:
            raise ModelError(f"{where} lacks {exc.args[0]!r}; the file is damaged or not an IP-Adapter") from None
    if not layers or len(adapter) != 2 * count:
        raise ModelError(f"{where} holds {len(adapter)} ip_adapter tensors; expected a to_k_ip and a to_v_ip weight "
                         "per cross-attention layer")  # fmt: skip
    weights = IPAdapterWeights(image_proj, layers)
    _check_shapes(weights, where)
    return weights


def _check_shapes(weights: IPAdapterWeights, where: str) -> None:
    width, proj = weights.cross_attention_dim, weights.image_proj
    tokens, rest = divmod(int(proj["proj.weight"].shape[0]), width)
    expected = {"proj.bias": (tokens * width,), "norm.weight": (width,), "norm.bias": (width,)}
    wrong = [name for name, shape in expected.items() if tuple(proj[name].shape) != shape]
    wrong += [f"layer {2 * i + 1}" for i, (k, v) in enumerate(weights.layers) if k.shape[1] != width or v.shape != k.shape]
    if rest or not tokens or wrong:
        raise ModelError(f"{where} has tensors of inconsistent shapes ({', '.join(wrong) or 'proj.weight'}) for "
                         f"{width}-wide cross-attention; the file is damaged or not an IP-Adapter")  # fmt: skip


def _adapter_files(root: Path) -> list[Path]:
    return [*root.glob("ip-adapter*.safetensors"), *root.glob("*/ip-adapter*.safetensors")]


def _encoder(folder: Path, model_id: str, dtype: str, device: str) -> Any:
    from transformers import CLIPVisionModelWithProjection

    try:
        loaded = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=torch_dtype(dtype), use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the image encoder of IP-Adapter {model_id!r} from {folder.name}/ beside its "
                         f"weights: {str(exc).rstrip('. ')}; it needs config.json and model.safetensors") from exc  # fmt: skip
    return prepare(loaded, device)


def _processor(folder: Path) -> Any:
    from transformers import CLIPImageProcessor

    size = int(read_json_file(folder / "config.json").get("image_size", 224))
    return CLIPImageProcessor(size=size, crop_size=size)
