"""Name a model's version without loading it: a local directory by its content, a hub id by commit.

The version goes into stage keys, so it must change whenever the weights a stage would load change.
A local directory is hashed (configs whole, weights by size and first and last MiB). A hub id is
named by the commit its revision points at *now*: ``main`` moves when the repo is updated, and a key
that said ``@main`` would serve stale results for the new weights.

Revisions resolve through huggingface_hub's cache layout first (``models--org--name/refs/<rev>``
holding the commit, ``snapshots/<commit>/`` holding the files), and only then by asking the hub,
which huggingface_hub refuses when its offline mode (``HF_HUB_OFFLINE``) is on.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub import constants as hf_constants

from reelflow.schemas.errors import ModelError

HUB_PREFIX = "hf-hub:"  # timm's spelling of a hub id
FIX = (
    "give a local path, or set HF_HOME to a cache that has it; "
    "`reelflow models tiny DIR` writes a test bundle"
)
_MIB = 1 << 20
_CONFIG_SUFFIXES = (".json", ".txt", ".model")  # .model: sentencepiece tokenizers
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# Hub repo ids: "name" or "org/name", letters, digits, "-", "_", "." (no "..", no leading dot).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_local(model_id: str) -> bool:
    """Whether ``model_id`` names an existing directory."""
    # Path("") is the working directory; an empty id is a mistake, not a request for it.
    return bool(model_id) and Path(model_id).is_dir()


def hub_repo_id(model_id: str) -> str:
    """The hub repo (``org/name``) that ``model_id`` names, without timm's ``hf-hub:`` prefix.

    Raises:
        ModelError: ``model_id`` is not shaped like a hub id.
    """
    repo = model_id.removeprefix(HUB_PREFIX)
    if not _HUB_ID.match(repo) or ".." in repo:
        raise ModelError(
            f"model {model_id!r} is not an existing directory and not a hub id (org/name); {FIX}"
        )
    return repo


def fingerprint(model_id: str, revision: str | None = None, *, cache_dir: str | None = None) -> str:
    """``"local:<16 hex>"`` for a directory, ``"hub:<org/name>@<commit>"`` for a hub id."""
    if is_local(model_id):
        return local_fingerprint(Path(model_id))
    repo = hub_repo_id(model_id)
    return f"hub:{repo}@{resolve_revision(model_id, revision, cache_dir)}"


def local_fingerprint(root: Path) -> str:
    """``"local:<16 hex>"`` over a directory's config and weight files.

    Raises:
        ModelError: The directory holds no config or weight files.
    """
    digest = hashlib.sha256()
    found = False
    for path in sorted(_model_files(root), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix().encode()
        if path.suffix in _CONFIG_SUFFIXES:
            digest.update(b"config\0" + rel + b"\0" + hashlib.sha256(path.read_bytes()).digest())
            found = True
        elif path.suffix in _WEIGHT_SUFFIXES:
            digest.update(b"weights\0" + rel + b"\0" + _weight_digest(path))
            found = True
    if not found:
        raise ModelError(f"model {str(root)!r} has no config or weight files; {FIX}")
    return "local:" + digest.hexdigest()[:16]


def _model_files(root: Path) -> list[Path]:
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


def resolve_revision(model_id: str, revision: str | None, cache_dir: str | None = None) -> str:
    """The 40-hex commit that a hub revision (branch, tag or commit; None is ``main``) points at.

    A commit is returned as is. Otherwise the hub answers, so a moved branch is seen at once; offline
    (huggingface_hub's offline mode), or when the hub cannot be reached, the hub cache's
    ``refs/<revision>`` does.

    Raises:
        ModelError: ``model_id`` is not a hub id, or the revision cannot be resolved; the message
            names the model, the revision and the ways out.
    """
    repo = hub_repo_id(model_id)
    rev = _check_revision(model_id, revision or "main")
    if COMMIT.match(rev):
        return rev
    unreachable: ModelError | None = None
    if not hf_constants.is_offline_mode():
        try:
            return _ask_hub(model_id, repo, rev)
        except ModelError as exc:  # no network: the cache may still know the revision
            unreachable = exc
    try:
        return _cached_commit(repo, rev, cache_dir)
    except FileNotFoundError as missing:
        if unreachable is not None:
            raise unreachable  # noqa: B904  (its cause is the hub's error, which says more than the cache miss)
        reason = f"it is not in the hub cache {_cache_root(cache_dir)} and HF_HUB_OFFLINE is set"
        raise ModelError(_unresolved(model_id, rev, reason)) from missing


def cached_snapshot(model_id: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """The cached snapshot directory of a hub id's revision, or None; never asks the hub."""
    try:
        repo = hub_repo_id(model_id)
        rev = _check_revision(model_id, revision or "main")
        commit = rev if COMMIT.match(rev) else _cached_commit(repo, rev, cache_dir)
    except (ModelError, FileNotFoundError):
        return None
    snapshot = _repo_cache(repo, cache_dir) / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def pinned_commit(model_id: str, version: str) -> str:
    """The commit in a hub fingerprint ``hub:<org/name>@<commit>`` taken for ``model_id``.

    Raises:
        ModelError: ``version`` is not a hub fingerprint of this model.
    """
    repo = hub_repo_id(model_id)
    prefix = f"hub:{repo}@"
    commit = version.removeprefix(prefix)
    if not version.startswith(prefix) or not COMMIT.match(commit):
        raise ModelError(
            f"fingerprint {version!r} does not name a commit of hub model {model_id!r} "
            f"(expected {prefix}<40 hex>); plan the run again so its fingerprints are retaken"
        )
    return commit


def _check_revision(model_id: str, revision: str) -> str:
    # A revision becomes a path under refs/; refuse one that would climb out of it.
    if revision.startswith("/") or ".." in revision.split("/"):
        raise ModelError(f"revision {revision!r} of model {model_id!r} is not a branch, tag or commit")
    return revision


def _cached_commit(repo: str, revision: str, cache_dir: str | None) -> str:
    """The commit ``refs/<revision>`` holds; FileNotFoundError when the cache has no such ref."""
    ref = _repo_cache(repo, cache_dir) / "refs" / revision
    commit = ref.read_text().strip()
    if not COMMIT.match(commit):
        raise ModelError(
            f"hub cache file {ref} should hold a 40-hex commit but holds {commit[:60]!r}; "
            "delete it and download the model again"
        )
    return commit


def _ask_hub(model_id: str, repo: str, revision: str) -> str:
    try:
        commit = HfApi().model_info(repo, revision=revision).sha
    except Exception as exc:  # any failure to ask (HTTP status, DNS, auth) means "unresolved"
        raise ModelError(_unresolved(model_id, revision, f"asking the hub failed ({exc})")) from exc
    if not commit or not COMMIT.match(commit):
        raise ModelError(_unresolved(model_id, revision, f"the hub answered commit {commit!r}"))
    return commit


def _unresolved(model_id: str, revision: str, reason: str) -> str:
    repo = model_id.removeprefix(HUB_PREFIX)
    return (
        f"cannot resolve revision {revision!r} of hub model {model_id!r} to a commit: {reason}; "
        f"download it (`hf download {repo} --revision {revision}`), pin a 40-hex commit as its "
        f"revision, or {FIX}"
    )


def _repo_cache(repo: str, cache_dir: str | None) -> Path:
    return _cache_root(cache_dir) / ("models--" + repo.replace("/", "--"))


def _cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or hf_constants.HF_HUB_CACHE)
