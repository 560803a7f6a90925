"""Find, identify and load models, by family, through one per-process cache.

A model is named by ``model_id``: a local directory, or a Hugging Face hub id (``org/name``; timm's
``hf-hub:org/name`` too) resolved through the local hub cache. Nothing here downloads on its own
account; whether the hub libraries may reach the network is the caller's environment
(``HF_HUB_OFFLINE``).

:data:`FAMILIES` maps a family name to its loader: ``diffusers``, ``transformers``, ``timm``,
``torchvision``, ``midas`` (MiDaS DPT depth checkpoints), ``ip_adapter`` (IP-Adapter weights and their
image encoder), ``soundclip`` (CLIP-aligned audio encoders), ``guided_diffusion`` (OpenAI's pixel-space
ADM UNets), ``lpips`` (the LPIPS VGG16 perceptual distance). :func:`fingerprint_model` names a model's
version without loading weights, for stage keys: a directory by content, a hub id by the commit its
revision points at.
:func:`load_model` loads exactly that version (the planned fingerprint pins it) and keeps it in a
small per-process cache, so stages that run in one worker share a UNet rather than each loading
its own. :func:`load_component` is the Stable Diffusion shorthand.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler

from reelflow.core.models.base import ModelFamily, ModelSource, class_key, torch_dtype
from reelflow.core.models.diffusers_family import DiffusersFamily
from reelflow.core.models.guided_diffusion_family import GuidedDiffusionFamily
from reelflow.core.models.identity import (
    cached_snapshot,
    hub_repo_id,
    is_local,
    local_fingerprint,
    pinned_commit,
    resolve_revision,
)
from reelflow.core.models.identity import fingerprint as _fingerprint
from reelflow.core.models.ip_adapter_family import IPAdapterFamily
from reelflow.core.models.lpips_family import LpipsFamily
from reelflow.core.models.midas_family import MidasFamily
from reelflow.core.models.soundclip_family import SoundclipFamily
from reelflow.core.models.timm_family import TimmFamily
from reelflow.core.models.torchvision_family import TorchvisionFamily
from reelflow.core.models.transformers_family import TransformersFamily
from reelflow.schemas.errors import ModelError

__all__ = [
    "CACHE_SIZE",
    "FAMILIES",
    "ModelFamily",
    "ModelSource",
    "check_weight_name",
    "clear_model_cache",
    "fingerprint_model",
    "get_family",
    "infer_family",
    "load_component",
    "load_model",
    "group_offload",
    "is_offloaded",
    "read_model_json",
    "resolve_revision",
    "torch_dtype",
]

CACHE_SIZE = 16  # entries, weightless ones (tokenizers, schedulers, processors) too: a Gen-1 edit with an IP-Adapter holds 11

# Checked in this order by infer_family; their layouts do not overlap.
FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (DiffusersFamily(), TransformersFamily(), TimmFamily(), TorchvisionFamily(), MidasFamily(),
                   IPAdapterFamily(), SoundclipFamily(), GuidedDiffusionFamily(), LpipsFamily())
}

# Stable Diffusion callers invert and sample with DDIM whatever scheduler a bundle ships.
_SD_CLASSES: dict[str, type] = {"scheduler": DDIMScheduler}

_CacheKey = tuple[str, str, str | None, str | None, str, str, str | None, str | None]
_cache: OrderedDict[_CacheKey, Any] = OrderedDict()
_cache_lock = threading.Lock()


def get_family(name: str) -> ModelFamily:
    """The loader registered under ``name``.

    Raises:
        ModelError: Unknown family; the message lists the valid ones.
    """
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelError(f"unknown model family {name!r}; valid: {', '.join(FAMILIES)}") from None


def infer_family(
    model_id: str, revision: str | None = None, cache_dir: str | None = None
) -> str | None:
    """The family whose layout a model's files have, or None when that cannot be told.

    A directory is read directly; a hub id only from its snapshot in the local hub cache (the hub
    is never asked). ``model_index.json`` means diffusers; ``config.json`` with ``architectures``
    transformers, with ``architecture`` and ``pretrained_cfg`` timm, with ``architecture`` and
    ``"library": "torchvision"`` torchvision, with ``architecture`` and ``"library": "midas"`` midas, with
    ``architecture`` and ``"library": "soundclip"`` soundclip, with ``"library": "guided_diffusion"``
    guided_diffusion, with ``"library": "lpips"`` lpips; a directory with only a MiDaS checkpoint under its published name
    (``dpt_large_384.pt``) is midas too.
    """
    root = Path(model_id) if is_local(model_id) else cached_snapshot(model_id, revision, cache_dir)
    if root is None:
        return None
    return next((name for name, loader in FAMILIES.items() if loader.recognises(root)), None)


def is_bundle(model_id: str, revision: str | None = None, cache_dir: str | None = None) -> bool:
    """Whether a model is a diffusers bundle of components (a ``model_index.json``), not one model.

    Known only from local files: a hub id not in the local hub cache is taken for a bundle, the common case.
    """
    root = Path(model_id) if is_local(model_id) else cached_snapshot(model_id, revision, cache_dir)
    return root is None or (root / "model_index.json").is_file()


def fingerprint_model(
    model_id: str,
    revision: str | None = None,
    *,
    family: str | None = None,
    cache_dir: str | None = None,
) -> str:
    """A short string that changes whenever the model's files change; no weights are loaded.

    A local directory hashes its config files whole and, per weight file (safetensors, bin, pth, pt),
    its size and the first and last MiB: cheap for multi-GB checkpoints, yet any retrain or
    re-export changes it. A hub id is named by the commit its revision resolves to, so a moved
    ``main`` changes the fingerprint (see :func:`resolve_revision`).

    Returns:
        ``"local:<16 hex>"`` or ``"hub:<org/name>@<40-hex commit>"``.

    Raises:
        ModelError: ``model_id`` is neither an existing directory nor shaped like a hub id, the
            directory holds no config or weight files, the revision cannot be resolved, or the
            family is unknown.
    """
    if family is not None:
        return get_family(family).fingerprint(model_id, revision, cache_dir=cache_dir)
    return _fingerprint(model_id, revision, cache_dir=cache_dir)


def load_model(
    model_id: str,
    *,
    family: str,
    component: str | None = None,
    cls: type | str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | None = None,
    fingerprint: str | None = None,
    weight_name: str | None = None,
    offload: str = "none",
) -> Any:
    """Load a model (or one component of it) from the process cache, or into it.

    Models come back in eval mode, without gradients, on ``device`` in ``dtype``. The cache keeps
    the ``CACHE_SIZE`` most recently used, keyed by family, the model's fingerprint (a local model
    changed on disk is loaded again), component, class, dtype, device and cache dir. A cached model
    is shared with every caller that asks for the same key: change one (attention processors,
    LoRA) only through a copy, or undo the change before returning. Schedulers come back fresh.

    Args:
        model_id: A local directory or a hub id.
        family: A key of :data:`FAMILIES`; :func:`infer_family` can tell it from the files.
        component: A diffusers bundle's subfolder (``"unet"``), or a transformers preprocessor
            (``"image_processor"``); None for the model itself.
        cls: Class override, or its name inside the family's libraries; e.g.
            ``CLIPVisionModelWithProjection`` for transformers (``AutoModel`` by default).
        revision: Hub branch, tag or commit; ignored for local directories and when
            ``fingerprint`` pins a hub commit.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``; ignored for components without
            weights.
        device: A torch device string; ignored for components without weights.
        cache_dir: Hub cache to read from instead of the default.
        fingerprint: The model's fingerprint when the run was planned. A hub id then loads that
            commit, whatever its branch points at now; a local model must still have it.
        weight_name: The one weight file to read, for a family whose repos publish several side by
            side (``ip_adapter``: ``models/ip-adapter_sd15.safetensors``); other families take none.
        offload: ``group``: a module's weights stay in CPU memory and each block of layers moves onto ``device``
            only while it runs (diffusers' group offloading, on CUDA with a transfer stream); components without
            weights ignore it.

    Raises:
        ModelError: Unknown family, component or dtype; a model id that is not a directory or a hub
            id; a revision that cannot be resolved; a local model changed since ``fingerprint``
            was taken; or files the library cannot load.
    """
    loader = get_family(family)
    torch_dtype(dtype)
    override = loader.class_override(cls)
    check_weight_name(family, weight_name)
    source, version = _locate(model_id, revision, cache_dir, fingerprint)
    if offload not in OFFLOADS:
        raise ModelError(f"offload {offload!r} is not one of {', '.join(OFFLOADS)}")
    key = (family, version, component, class_key(override), dtype, str(torch.device(device)), cache_dir, weight_name, offload)
    named = {"weight_name": weight_name} if loader.takes_weight_name else {}

    def load() -> Any:
        if offload == "none":
            return loader.load(source, component=component, cls=override, dtype=dtype, device=device, **named)
        loaded = loader.load(source, component=component, cls=override, dtype=dtype, device="cpu", **named)
        if not isinstance(loaded, torch.nn.Module):  # a tokenizer, a scheduler, weights held otherwise: as without offload
            return loader.load(source, component=component, cls=override, dtype=dtype, device=device, **named)
        return group_offload(loaded, device)

    with _cache_lock:
        # Loading under the lock means two stages asking for one UNet load it once; loads are rare.
        if key not in _cache:
            _cache[key] = load()
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
        _cache.move_to_end(key)
        loaded = _cache[key]
    return loader.handout(loaded, load)


OFFLOADS = ("none", "group")


def group_offload(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model`` (on the CPU) with diffusers' group offloading onto ``device``: a diffusers model by blocks (its
    top-level lists of layers, one block at a time), any other module (UMT5, CLIP) by its leaf layers, each moved
    there just before it runs and back after. The hooks move shared weights: a caller running the model from
    several threads holds its lock (:func:`is_offloaded` tells)."""
    from diffusers import ModelMixin
    from diffusers.hooks import apply_group_offloading

    onload = torch.device(device)
    by_block = {"offload_type": "block_level", "num_blocks_per_group": 1} if isinstance(model, ModelMixin) else {"offload_type": "leaf_level"}
    apply_group_offloading(model, onload_device=onload, offload_device=torch.device("cpu"), use_stream=onload.type == "cuda",
                           **by_block)  # fmt: skip
    return model


def is_offloaded(model: Any) -> bool:
    """Whether ``model`` runs under offloading hooks (see :func:`group_offload`)."""
    return isinstance(model, torch.nn.Module) and any(hasattr(m, "_diffusers_hook") for m in model.modules())


def check_weight_name(family: str, weight_name: str | None) -> None:
    """Refuse a ``weight_name`` for a family that reads its model whole, and a missing one where it is needed.

    Raises:
        ModelError: Either mismatch; the message names the fix.
    """
    takes = get_family(family).takes_weight_name
    if weight_name is not None and not takes:
        raise ModelError(f"models of family {family} are read whole, so they take no weight_name ({weight_name!r}); "
                         "leave it unset")  # fmt: skip
    if weight_name is None and takes:
        raise ModelError(f"models of family {family} name the file to read with `models.<name>.weight_name` "
                         "(e.g. models/ip-adapter_sd15.safetensors)")  # fmt: skip


def load_component(
    model_id: str,
    component: str,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: str | None = None,
    fingerprint: str | None = None,
) -> Any:
    """One component of a Stable-Diffusion-style bundle: :func:`load_model` for ``diffusers``.

    ``component`` is a subfolder the bundle's ``model_index.json`` lists (``"vae"``, ``"unet"``,
    ``"text_encoder"``, ``"tokenizer"``, ``"scheduler"``); the scheduler is always a
    ``DDIMScheduler`` built from the bundle's scheduler config.
    """
    return load_model(
        model_id,
        family="diffusers",
        component=component,
        cls=_SD_CLASSES.get(component),
        revision=revision,
        dtype=dtype,
        device=device,
        cache_dir=cache_dir,
        fingerprint=fingerprint,
    )


def read_model_json(
    model_id: str,
    path: str,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any] | None:
    """The JSON file at ``path`` inside a model (``"unet/config.json"``), read without loading weights.

    The version is found as :func:`load_model` finds it, so ``fingerprint`` pins a hub commit and a
    local model must still have it. Returns None when the model has no such file.

    Raises:
        ModelError: As :func:`load_model` for the model's location; the file is not a JSON object.
        OSError: A hub file that is neither cached nor downloadable.
    """
    source, _ = _locate(model_id, revision, cache_dir, fingerprint)
    return source.read_json(path)


def clear_model_cache() -> None:
    """Drop every cached model (their memory is freed once no caller holds them)."""
    with _cache_lock:
        _cache.clear()


def _locate(
    model_id: str, revision: str | None, cache_dir: str | None, fingerprint: str | None
) -> tuple[ModelSource, str]:
    """Where the version to load lives, and its fingerprint (which keys the cache)."""
    if is_local(model_id):
        path = Path(model_id)
        version = local_fingerprint(path)
        if fingerprint is not None and fingerprint != version:
            raise ModelError(
                f"model {model_id!r} changed on disk since the run was planned (fingerprint "
                f"{fingerprint} then, {version} now); rerun so the stages that use it are recomputed"
            )
        return ModelSource(model_id, path=path), version
    repo = hub_repo_id(model_id)
    if fingerprint is not None:
        commit = pinned_commit(model_id, fingerprint)
    else:
        commit = resolve_revision(model_id, revision, cache_dir)
    source = ModelSource(model_id, repo_id=repo, commit=commit, cache_dir=cache_dir)
    return source, f"hub:{repo}@{commit}"
