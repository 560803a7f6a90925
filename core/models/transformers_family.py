"""The transformers family: a model directory or hub repo with ``config.json`` naming its architectures.

The caller passes the model class (``CLIPVisionModelWithProjection`` for image embeddings,
``AutoModelForDepthEstimation`` for depth), ``AutoModel`` by default. Preprocessing comes from the
same directory as a component: ``processor``, ``image_processor``, ``feature_extractor`` or
``tokenizer``, each through its ``Auto*`` class. Remote code is never trusted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers
from transformers import (
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
)

from reelflow.core.models.base import (
    ModelFamily,
    ModelSource,
    prepare,
    read_root_config,
    torch_dtype,
)
from reelflow.core.models.identity import FIX
from reelflow.schemas.errors import ModelError

MODEL = "model"
_PREPROCESSORS: dict[str, type] = {
    "processor": AutoProcessor,
    "image_processor": AutoImageProcessor,
    "feature_extractor": AutoFeatureExtractor,
    "tokenizer": AutoTokenizer,
}


class TransformersFamily(ModelFamily):
    name = "transformers"
    libraries = (transformers,)
    description = (
        "transformers model (config.json with architectures); the caller names the class, "
        "AutoModel by default; processor, image_processor, feature_extractor, tokenizer as components"
    )

    def recognises(self, root: Path) -> bool:
        return "architectures" in read_root_config(root)

    def load(
        self,
        source: ModelSource,
        *,
        component: str | None = None,
        cls: type | None = None,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> Any:
        kind = component or MODEL
        target = _target_class(kind, cls)
        where, kwargs = source.pretrained_args()
        if kind == MODEL:
            # Safetensors only: a pickled pytorch_model.bin can run code when loaded.
            kwargs |= {"dtype": torch_dtype(dtype), "use_safetensors": True}
        if target.__module__.startswith("transformers.models.auto."):
            kwargs["trust_remote_code"] = False  # an Auto* class could otherwise import repo code
        try:
            loaded = target.from_pretrained(where, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(_load_failure(source, kind, exc)) from exc
        return prepare(loaded, device)


def _target_class(kind: str, cls: type | None) -> type:
    if kind != MODEL and kind not in _PREPROCESSORS:
        raise ModelError(
            f"unknown transformers component {kind!r}; valid: {', '.join([MODEL, *_PREPROCESSORS])}"
        )
    if cls is not None:
        return cls
    return AutoModel if kind == MODEL else _PREPROCESSORS[kind]


def _load_failure(source: ModelSource, kind: str, exc: Exception) -> str:
    cause = str(exc).rstrip(". ")
    if source.is_local:
        fix = (
            "check that it is a transformers model directory with config.json and model.safetensors "
            "(and the processor's config for a processor)"
        )
    else:
        fix = FIX
    return f"cannot load the {kind} of model {source.model_id!r}: {cause}; {fix}"
