"""Find, identify and load the components of a Stable-Diffusion-style model.

A model is named by ``model_id``: a local directory in the diffusers layout, or a Hugging Face hub
id (``org/name``) resolved through the local hub cache. Nothing here downloads on its own account;
whether the hub libraries may reach the network is the caller's environment (``HF_HUB_OFFLINE``).

:func:`fingerprint_model` names a model's version without loading weights, for stage keys.
:func:`load_component` loads one component and keeps it in a small per-process cache, so stages
that run in one worker share a UNet rather than each loading its own.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from reelflow.schemas.errors import ModelError

CACHE_SIZE = 8
_MIB = 1 << 20
_CONFIG_SUFFIXES = (".json", ".txt")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Hub repo ids: "name" or "org/name", letters, digits, "-", "_", "." (no "..", no leading dot).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_FIX = (
    "give a local path, or set HF_HOME to a cache that has it; "
    "`reelflow models tiny DIR` writes a test bundle"
)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class _Loader:
    """How one component is loaded.

    Attributes:
        cls: The class whose ``from_pretrained`` reads the component's subfolder.
        dtype_kwarg: The keyword that class takes for a dtype (diffusers and transformers differ);
            ``None`` for components without weights.
        shared: Whether callers may share one instance. Schedulers are not shared, because
            ``set_timesteps`` changes them in place.
    """

    cls: type
    dtype_kwarg: str | None
    shared: bool = True


_LOADERS: dict[str, _Loader] = {
    "vae": _Loader(AutoencoderKL, "torch_dtype"),
    "unet": _Loader(UNet2DConditionModel, "torch_dtype"),
    "text_encoder": _Loader(CLIPTextModel, "dtype"),
    "tokenizer": _Loader(CLIPTokenizer, None),
    "scheduler": _Loader(DDIMScheduler, None, shared=False),
}

_cache: OrderedDict[tuple[str, str, str, str, str | None], Any] = OrderedDict()
_cache_lock = threading.Lock()


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` for ``"float32"``, ``"float16"`` or ``"bfloat16"``."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; valid: {', '.join(_DTYPES)}") from None


def fingerprint_model(model_id: str, revision: str | None = None) -> str:
    """A short string that changes whenever the model's files change; no weights are loaded.

    A local directory hashes its config files whole and, per weight file, its size and the first
    and last MiB: cheap for multi-GB checkpoints, yet any retrain or re-export changes it. A hub id
    is named by id and revision, since the hub pins content by revision.

    Returns:
        ``"local:<16 hex>"`` or ``"hub:<model_id>@<revision or main>"``.

    Raises:
        ModelError: ``model_id`` is neither an existing directory nor shaped like a hub id, or the
            directory holds no config or weight files.
    """
    if _is_local(model_id):
        return "local:" + _hash_local(Path(model_id))[:16]
    _require_hub_id(model_id)
    return f"hub:{model_id}@{revision or 'main'}"


def _hash_local(root: Path) -> str:
    digest = hashlib.sha256()
    found = False
    for path in sorted(_bundle_files(root), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix().encode()
        if path.suffix in _CONFIG_SUFFIXES:
            digest.update(b"config\0" + rel + b"\0" + hashlib.sha256(path.read_bytes()).digest())
            found = True
        elif path.suffix in _WEIGHT_SUFFIXES:
            digest.update(b"weights\0" + rel + b"\0" + _weight_digest(path))
            found = True
    if not found:
        raise ModelError(f"model {str(root)!r} has no config or weight files; {_FIX}")
    return digest.hexdigest()


def _bundle_files(root: Path) -> list[Path]:
    # Dot-directories hold caches (``.cache/huggingface`` from ``local_dir`` downloads) whose
    # timestamps change without the model changing.
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]


def _weight_digest(path: Path) -> bytes:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(_MIB)
        f.seek(max(size - _MIB, 0))
        tail = f.read(_MIB)
    return str(size).encode() + hashlib.sha256(head).digest() + hashlib.sha256(tail).digest()


def _is_local(model_id: str) -> bool:
    # Path("") is the working directory; an empty id is a mistake, not a request for it.
    return bool(model_id) and Path(model_id).is_dir()


def _require_hub_id(model_id: str) -> None:
    if not _HUB_ID.match(model_id) or ".." in model_id:
        raise ModelError(
            f"model {model_id!r} is not an existing directory and not a hub id (org/name); {_FIX}"
        )


def load_component(
    model_id: str,
    component: str,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | None = None,
) -> Any:
    """Load one component of a diffusers-layout model, from the process cache when it is there.

    Models come back in eval mode, without gradients, on ``device`` in ``dtype``. The cache keeps
    the ``CACHE_SIZE`` most recently used, keyed by the model's fingerprint (a local bundle changed
    on disk is loaded again), component, dtype, device and cache dir. A cached model is shared with
    every caller that asks for the same key: change one (attention processors, LoRA) only through a
    copy, or undo the change before returning. Schedulers come back fresh each call.

    Args:
        model_id: A local directory or a hub id.
        component: ``"vae"``, ``"unet"``, ``"text_encoder"``, ``"tokenizer"`` or ``"scheduler"``.
        revision: Hub branch, tag or commit; ignored for local directories.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``; ignored for tokenizer and scheduler.
        device: A torch device string; ignored for tokenizer and scheduler.
        cache_dir: Hub cache to read from instead of the default.

    Raises:
        ModelError: Unknown component or dtype, a model id that is not a directory or a hub id, or
            a component the library cannot load (not cached while offline, missing files).
    """
    loader = _loader(component)
    torch_dtype(dtype)
    # Keyed by content, not path: a bundle rebuilt in place must not be served from the cache.
    version = fingerprint_model(model_id, revision)
    key = (version, component, dtype, str(torch.device(device)), cache_dir)
    with _cache_lock:
        # Loading under the lock means two stages asking for one UNet load it once; loads are rare.
        if key not in _cache:
            _cache[key] = _load(loader, model_id, component, revision, dtype, device, cache_dir)
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
        _cache.move_to_end(key)
        loaded = _cache[key]
    return loaded if loader.shared else loader.cls.from_config(loaded.config)


def clear_model_cache() -> None:
    """Drop every cached component (their memory is freed once no caller holds them)."""
    with _cache_lock:
        _cache.clear()


def _load_failure(model_id: str, component: str, exc: OSError) -> str:
    cause = str(exc).rstrip(". ")
    if _is_local(model_id):
        fix = (
            f"check that it is a diffusers-layout bundle with a {component}/ folder holding "
            "config and safetensors weights; `reelflow models tiny DIR` writes a test bundle"
        )
    else:
        fix = _FIX
    return f"cannot load {component!r} of model {model_id!r}: {cause}; {fix}"


def _loader(component: str) -> _Loader:
    try:
        return _LOADERS[component]
    except KeyError:
        raise ModelError(
            f"unknown model component {component!r}; valid: {', '.join(_LOADERS)}"
        ) from None


def _load(
    loader: _Loader,
    model_id: str,
    component: str,
    revision: str | None,
    dtype: str,
    device: str,
    cache_dir: str | None,
) -> Any:
    if not _is_local(model_id):
        _require_hub_id(model_id)
    kwargs: dict[str, Any] = {"subfolder": component, "revision": revision, "cache_dir": cache_dir}
    if loader.dtype_kwarg is not None:
        # Safetensors only: a pickled .bin can run code when loaded.
        kwargs |= {loader.dtype_kwarg: torch_dtype(dtype), "use_safetensors": True}
    try:
        loaded = loader.cls.from_pretrained(model_id, **kwargs)
    except OSError as exc:
        raise ModelError(_load_failure(model_id, component, exc)) from exc
    if isinstance(loaded, torch.nn.Module):
        loaded = loaded.to(device).eval().requires_grad_(False)
    return loaded
