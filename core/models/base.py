"""What every model family shares: where a version's files are, dtypes, and the loader contract."""

from __future__ import annotations

import json
import pickle
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import RemoteEntryNotFoundError

from reelflow.core.models import identity
from reelflow.schemas.errors import ModelError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` for ``"float32"``, ``"float16"`` or ``"bfloat16"``."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; valid: {', '.join(_DTYPES)}") from None


@dataclass(frozen=True)
class ModelSource:
    """Where one version of a model lives: a local directory, or a hub repo pinned to a commit.

    Attributes:
        model_id: The id as the caller gave it, for messages.
        path: The local directory; None for a hub repo.
        repo_id: The hub repo, ``org/name`` (without timm's ``hf-hub:``); None for a directory.
        commit: The 40-hex commit the hub revision resolved to; None for a directory.
        cache_dir: The hub cache to read; None for huggingface_hub's default.
    """

    model_id: str
    path: Path | None = None
    repo_id: str | None = None
    commit: str | None = None
    cache_dir: str | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def pretrained_args(self) -> tuple[str, dict[str, Any]]:
        """The path or repo and the keywords with which ``from_pretrained`` reads this version."""
        if self.path is not None:
            return str(self.path), {}
        return str(self.repo_id), {"revision": self.commit, "cache_dir": self.cache_dir}

    def read_json(self, name: str) -> dict[str, Any] | None:
        """The JSON file ``name`` at the model's root, or None when the model has no such file.

        Raises:
            ModelError: The file is not a JSON object.
            OSError: A hub file that is neither cached nor downloadable.
        """
        if self.path is not None:
            path = self.path / name
            return read_json_file(path) if path.is_file() else None
        try:
            found = hf_hub_download(
                str(self.repo_id), name, revision=self.commit, cache_dir=self.cache_dir
            )
        except RemoteEntryNotFoundError:
            return None
        return read_json_file(Path(found))

    def directory(self, patterns: list[str]) -> Path:
        """A local directory with the model's files matching ``patterns`` (glob patterns).

        A hub version comes from its cached snapshot, downloaded first when the environment
        lets huggingface_hub reach the network.
        """
        if self.path is not None:
            return self.path
        return Path(
            snapshot_download(
                str(self.repo_id),
                revision=self.commit,
                cache_dir=self.cache_dir,
                allow_patterns=patterns,
            )
        )


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``.

    Raises:
        ModelError: The file is not valid JSON or not an object.
    """
    try:
        loaded = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model config {path} is not valid JSON ({exc}); fix or re-download it") from exc
    if not isinstance(loaded, dict):
        raise ModelError(f"model config {path} holds a JSON {type(loaded).__name__}, not an object")
    return loaded


def read_root_config(root: Path) -> dict[str, Any]:
    """``root/config.json`` as a dict; empty when absent or unreadable (for recognising layouts)."""
    try:
        return read_json_file(root / "config.json")
    except (OSError, ModelError):
        return {}


def load_pickled_weights(path: Path) -> Any:
    """What the checkpoint at ``path`` holds, unpickled weights-only onto the CPU.

    ``torch.load(weights_only=True)`` admits only tensors and plain containers, so a crafted
    pickle cannot run code.

    Raises:
        ModelError: The file holds more than that.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{path} holds more than tensors, so it is not unpickled (that could run code); "
            f"save the state dict alone, or as safetensors: {exc}"
        ) from exc


def find_checkpoint(root: Path, safe_name: str, pattern: str, what: str, origin: str = "as published") -> Path:
    """The weights file in ``root``: ``safe_name`` (safetensors) when present, else its one file matching the glob
    ``pattern``, as published checkpoints (``dpt_large_384.pt``, ``tpami_encoder40.pth``, lpips' ``vgg.pth``) come.

    Raises:
        ModelError: No such file, or several matches; the message is ``what`` (the model and what it needs), the
            files it looks for and ``origin`` (where the published file comes from).
    """
    if (root / safe_name).is_file():
        return root / safe_name
    pickled = sorted(p for p in root.glob(pattern) if p.is_file())
    if len(pickled) != 1:
        raise ModelError(f"{what} at {root}: {safe_name}, or exactly one {pattern} ({origin}); found "
                         f"{', '.join(p.name for p in pickled) or 'none'}")  # fmt: skip
    return pickled[0]


def read_weights(path: Path) -> Any:
    """A safetensors file's tensors, or a pickled checkpoint unpickled weights-only (:func:`load_pickled_weights`)."""
    from safetensors.torch import load_file

    return load_file(path) if path.suffix == ".safetensors" else load_pickled_weights(path)


def read_checkpoint(root: Path, safe_name: str, pattern: str, what: str, origin: str = "as published") -> Any:
    """What the weights file :func:`find_checkpoint` finds holds (:func:`read_weights`)."""
    return read_weights(find_checkpoint(root, safe_name, pattern, what, origin))


def is_state_dict(loaded: Any) -> bool:
    """Whether ``loaded`` maps names to tensors, and nothing else."""
    return isinstance(loaded, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    )


def resolve_class(name: str, modules: tuple[ModuleType, ...], what: str) -> type:
    """The class called ``name`` in the first of ``modules`` that has one, and nowhere else.

    Looking names up only inside known libraries keeps a downloaded config from choosing what code
    runs (the ``trust_remote_code`` hole).

    Raises:
        ModelError: No such class in those libraries.
    """
    for module in modules:
        found = getattr(module, name, None) if name.isidentifier() else None
        if isinstance(found, type):
            return found
    libraries = ", ".join(m.__name__ for m in modules)
    raise ModelError(f"{what} names class {name!r}, which {libraries} do not have")


def class_key(cls: type | None) -> str | None:
    """A stable name for a class override, for cache keys."""
    return None if cls is None else f"{cls.__module__}.{cls.__qualname__}"


def prepare(module: Any, device: str, dtype: torch.dtype | None = None) -> Any:
    """A loaded ``torch.nn.Module`` on ``device`` (and in ``dtype``), in eval mode, without grads."""
    if not isinstance(module, torch.nn.Module):
        return module
    # No dtype unless one is asked for: a diffusers model loaded with torch_dtype keeps its _keep_in_fp32_modules
    # (Wan's norms and time embedding) in float32, and `.to(dtype=...)` would warn that it casts them.
    moved = module.to(device=device) if dtype is None else module.to(device=device, dtype=dtype)
    return moved.eval().requires_grad_(False)


def no_component(family: str, component: str | None, cls: type | None) -> None:
    """Refuse a component or class override for a family whose models are one module."""
    if component is not None or cls is not None:
        raise ModelError(
            f"a {family} model is one module: it takes no component ({component!r}) "
            f"or class ({class_key(cls)!r}); leave both unset"
        )


class ModelFamily(ABC):
    """One family of models: how to recognise its files, name their version and load them.

    A loader is stateless; the process cache in ``reelflow.core.models`` decides when to call it.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    libraries: ClassVar[tuple[ModuleType, ...]] = ()  # where a class override named by string is found
    takes_weight_name: ClassVar[bool] = False  # whether the model names one weight file of several (load's weight_name)

    def class_override(self, cls: type | str | None) -> type | None:
        """A caller's class override as a class; a name is looked up in :attr:`libraries` only.

        Raises:
            ModelError: No such class there, or a family that takes no class override.
        """
        if cls is None or isinstance(cls, type):
            return cls
        if not self.libraries:
            raise ModelError(f"a {self.name} model takes no class override ({cls!r}); leave it unset")
        return resolve_class(cls, self.libraries, f"the {self.name} class override")

    def fingerprint(
        self, model_id: str, revision: str | None = None, *, cache_dir: str | None = None
    ) -> str:
        """The model's version: ``local:<16 hex>`` over its files or ``hub:<org/name>@<commit>``."""
        return identity.fingerprint(model_id, revision, cache_dir=cache_dir)

    @abstractmethod
    def recognises(self, root: Path) -> bool:
        """Whether the files in directory ``root`` are laid out as this family's."""

    @abstractmethod
    def load(
        self,
        source: ModelSource,
        *,
        component: str | None = None,
        cls: type | None = None,
        dtype: str = "float32",
        device: str = "cpu",
    ) -> Any:
        """Load the model (or one component of it) from ``source``, ready for inference.

        ``cls`` overrides the class the files would choose (see :meth:`class_override`). A family
        that :attr:`takes_weight_name` also receives ``weight_name``, the file the model names.

        Raises:
            ModelError: Unknown component or class, missing or mismatched files.
        """

    def handout(self, loaded: Any, reload: Callable[[], Any]) -> Any:
        """What a caller receives for a cached ``loaded``: the shared instance, unless mutable.

        A tokenizer is (and a processor holding one): a fast tokenizer keeps its padding and truncation
        settings on its one Rust object and each call sets them, so two stages tokenizing at once (one
        padding prompts, one looking up words) would trip each other. Each caller gets its own, loaded
        again with ``reload`` (milliseconds; a deep copy is not faithful: the tokenizers library's
        serialisation drops a BPE model's end-of-word suffix on decoding).
        """
        from transformers import PreTrainedTokenizerBase, ProcessorMixin

        if isinstance(loaded, PreTrainedTokenizerBase | ProcessorMixin):
            return reload()
        return loaded
