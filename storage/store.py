"""The artifact store: one Zarr v3 group per stage output, on any fsspec filesystem.

Layout: ``{root}/artifacts/{stage}/{key[:2]}/{key}.zarr``. Each group carries its provenance in
attrs and a ``complete`` attribute that is written last; readers refuse a group without it, so a
crashed writer never leaves something that reads as finished.

Commit protocol by capability (``atomic_rename``):
- local disks: write to a sibling ``{key}.zarr.tmp-{unix time}-{token}``, mark it complete, then
  ``os.rename`` it into place (atomic within one filesystem);
- object stores and memory://: there is no atomic directory rename, so write in place and let the
  single PUT of the group's ``zarr.json`` that sets ``complete`` be the publish step.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore

from reelflow.schemas.errors import ArtifactIncomplete, ArtifactNotFound, LeaseHeld, StoreError
from reelflow.schemas.refs import ArraySpec, ArtifactRef
from reelflow.storage.arrays import frame_chunks, storage_dtype
from reelflow.storage.files import normalize_url

ARTIFACTS = "artifacts"
PICTURES = "pictures"
TEMP_MARK = ".tmp-"
TRASH_MARK = ".trash-"
RESUME_MARK = f"{TEMP_MARK}resume"  # the fixed temporary name of a resumable write, found again after a crash
PARTS_DONE = "parts_done"
ATTEMPT = "attempt"  # a resumable write's current attempt; a stalled attempt that lost it stops writing
_COMPRESSOR = zarr.codecs.ZstdCodec(level=3)
_ARTIFACT_URL = re.compile(r"^(?P<root>.*?)/?artifacts/(?P<stage>[a-z0-9_]+)/[0-9a-f]{2}/(?P<key>[0-9a-f]{64})\.zarr/?$")


@dataclass(frozen=True)
class ArtifactInfo:
    """What a listing knows about one artifact without opening its arrays."""

    stage: str
    key: str
    path: str
    url: str
    complete: bool
    created_at: float
    attrs: Mapping[str, Any] = field(default_factory=dict)


class ArtifactWriter:
    """Writes arrays and attrs into a group that is not yet complete."""

    def __init__(
        self, group: zarr.Group, path: str, *, resumable: bool = False, stored_attrs: Callable[[], dict] | None = None
    ) -> None:
        self.group = group
        self.path = path
        self.resumable = resumable
        done = group.attrs.get(PARTS_DONE, []) if resumable else []
        self.resumed_parts: tuple[str, ...] = tuple(done)  # parts an earlier attempt finished
        self._done = list(done)
        self._stored_attrs = stored_attrs  # the group's attrs as stored now, to tell whether it is still ours
        self.attempt = group.attrs.get(ATTEMPT, "")

    def check_attempt(self) -> None:
        """Refuse to write on when another attempt reopened this partial write (this one stalled past its lease)."""
        if self._stored_attrs is not None and self._stored_attrs().get(ATTEMPT) != self.attempt:
            raise LeaseHeld(
                f"another attempt took over the write of {self.path} (this one stalled past its lease); "
                "its output is kept and this one's discarded"
            )

    def is_done(self, part: str) -> bool:
        """Whether ``part`` (a step, a window) was written completely by this or an earlier attempt."""
        return part in self._done

    def mark_done(self, part: str) -> None:
        """Record that ``part`` is fully written; a resumed write skips it. Call after its data is stored."""
        if not self.resumable:
            raise ValueError("mark_done needs a resumable write (ArtifactStore.write(..., resumable=True))")
        if part not in self._done:
            self.check_attempt()
            self._done.append(part)
            self.group.attrs.update({PARTS_DONE: list(self._done), "touched_at": time.time()})

    def create_array(
        self,
        name: str,
        *,
        shape: tuple[int, ...],
        dtype: str | np.dtype,
        dims: tuple[str, ...],
        chunks: tuple[int, ...] | None = None,
        attrs: Mapping[str, Any] | None = None,
        compressor: zarr.abc.codec.BytesBytesCodec | None = None,
    ) -> zarr.Array:
        """An empty array chunked along its first axis, for stages that stream their output.

        In a resumed write an array of that name, shape and dtype is returned as the earlier attempt left it.
        """
        dtype = np.dtype(dtype)
        if self.resumable and name in self.group:
            existing = self.group[name]
            if isinstance(existing, zarr.Array) and existing.shape == tuple(shape) and existing.dtype == dtype:
                return existing
        return self.group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunks or frame_chunks(shape, dtype.itemsize),
            compressors=compressor or _COMPRESSOR,
            dimension_names=list(dims),
            attributes=dict(attrs or {}),
            fill_value=0,
            overwrite=self.resumable,
        )

    def write_array(
        self,
        name: str,
        data: np.ndarray,
        *,
        dims: tuple[str, ...],
        dtype: str | np.dtype | None = None,
        chunks: tuple[int, ...] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> zarr.Array:
        """Write a whole array; floats are stored as float16 when that is lossless enough, unless ``dtype`` is given."""
        dtype = np.dtype(dtype) if dtype is not None else storage_dtype(data)
        array = self.create_array(name, shape=data.shape, dtype=dtype, dims=dims, chunks=chunks, attrs=attrs)
        array[...] = data.astype(dtype, copy=False)
        return array

    def update_attrs(self, values: Mapping[str, Any]) -> None:
        self.group.attrs.update(dict(values))


class ArtifactStore:
    """Artifacts under one root URL (local path, file://, memory://, s3://, ...)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self.url = normalize_url(url)
        try:
            self.fs, self.root = fsspec.url_to_fs(self.url, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"cannot open store {url!r}: {exc}; check the URL scheme and storage options") from exc
        self.root = self.root.rstrip("/")
        self.atomic_rename = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    # paths -----------------------------------------------------------------------------------

    @staticmethod
    def artifact_path(stage: str, key: str) -> str:
        return f"{ARTIFACTS}/{stage}/{key[:2]}/{key}.zarr"

    def abspath(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str) -> str:
        return self.abspath(rel) if self.atomic_rename else self.fs.unstrip_protocol(self.abspath(rel))

    def ensure_reachable(self) -> None:
        """Fail early, with the fix, when the store root cannot be created or written."""
        probe = self.abspath(f".probe-{uuid.uuid4().hex[:8]}")
        try:
            self.fs.makedirs(self.abspath(ARTIFACTS), exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm(probe)
        except (OSError, PermissionError) as exc:
            raise StoreError(
                f"store {self.url!r} is not writable ({type(exc).__name__}: {exc}); "
                "point --store or REELFLOW_STORE at a writable location"
            ) from exc

    def ensure_exists(self) -> None:
        """Refuse a store root that is not there, creating nothing: for commands that only read or prune one."""
        if not self.fs.isdir(self.root):
            raise StoreError(
                f"store {self.url!r} does not exist; check --store or REELFLOW_STORE "
                "(a run creates its store, list/inspect/gc only read one)"
            )

    # reading ---------------------------------------------------------------------------------

    def read_attrs(self, rel: str) -> dict[str, Any]:
        """The group attrs straight from ``zarr.json``, without opening any array."""
        try:
            meta = json.loads(self.fs.cat_file(f"{self.abspath(rel)}/zarr.json"))
        except FileNotFoundError:
            raise ArtifactNotFound(
                f"no artifact at {self.url_of(rel)!r}; check the store URL, or run the pipeline that produces it"
            ) from None
        return dict(meta.get("attributes", {}))

    def is_complete(self, stage: str, key: str) -> bool:
        try:
            return bool(self.read_attrs(self.artifact_path(stage, key)).get("complete"))
        except ArtifactNotFound:
            return False

    def open(self, stage: str, key: str) -> zarr.Group:
        return self.open_path(self.artifact_path(stage, key))

    def open_path(self, rel: str) -> zarr.Group:
        """Open a complete artifact read-only; an unfinished one raises ArtifactIncomplete."""
        if not self.read_attrs(rel).get("complete"):
            raise ArtifactIncomplete(
                f"artifact {self.url_of(rel)!r} was never completed (its writer failed or is still running); "
                "rerun the pipeline to recompute it"
            )
        return zarr.open_group(self._zarr_store(self.abspath(rel), read_only=True), mode="r")

    def ref(self, stage: str, key: str) -> ArtifactRef:
        group = self.open(stage, key)
        arrays = {
            name: ArraySpec(shape=a.shape, dtype=str(a.dtype), dims=tuple(a.metadata.dimension_names or ()))
            for name, a in sorted(group.arrays())
        }
        prov = group.attrs.get("provenance", {})
        return ArtifactRef(
            store=self.url,
            path=self.artifact_path(stage, key),
            stage=stage,
            key=key,
            arrays=arrays,
            run_id=str(prov.get("run_id", "")),
            task_run_id=str(prov.get("task_run_id", "")),
        )

    # writing ---------------------------------------------------------------------------------

    @contextmanager
    def write(
        self, stage: str, key: str, attrs: Mapping[str, Any], *, resumable: bool = False
    ) -> Iterator[ArtifactWriter]:
        """Create the artifact's group; on success mark it complete and publish it, on error remove it.

        A ``resumable`` write keeps its partial group when it fails or its process dies, and the next
        write of the same key reopens it: the writer says which parts are done
        (:meth:`ArtifactWriter.is_done`) and which an earlier attempt stored (``resumed_parts``), and the
        body computes only the others. Readers still never see it before the ``complete`` marker.
        """
        final = self.abspath(self.artifact_path(stage, key))
        target = self._write_target(final, resumable)
        group = self._resumed_group(target, key) if resumable else None
        attempt = {ATTEMPT: uuid.uuid4().hex} if resumable else {}
        if group is not None:
            group.attrs.update({**attrs, **attempt, "complete": False, "resumed_at": time.time()})
        else:
            if not self.atomic_rename and self.fs.exists(target):
                self.fs.rm(target, recursive=True)
            started = {**attrs, **attempt, "complete": False, "started_at": time.time()}
            group = zarr.open_group(self._zarr_store(target, read_only=False), mode="w", attributes=started)
        stored = functools.partial(self._group_attrs, target) if resumable else None
        writer = ArtifactWriter(group, target, resumable=resumable, stored_attrs=stored)
        try:
            yield writer
            writer.check_attempt()
            group.attrs.update({"complete": True, "completed_at": time.time()})
        except BaseException:
            if not resumable:
                self._remove_abs(target)
            raise
        if self.atomic_rename:
            self._publish(target, final)

    def _write_target(self, final: str, resumable: bool) -> str:
        if not self.atomic_rename:
            return final
        if resumable:
            return f"{final}{RESUME_MARK}"
        return f"{final}{TEMP_MARK}{int(time.time())}-{uuid.uuid4().hex[:8]}"

    def _group_attrs(self, path: str) -> dict[str, Any]:
        try:
            return dict(json.loads(self.fs.cat_file(f"{path}/zarr.json")).get("attributes", {}))
        except (FileNotFoundError, ValueError):
            return {}

    def _resumed_group(self, target: str, key: str) -> zarr.Group | None:
        """The partial group an earlier attempt at ``key`` left, if there is one to continue."""
        attrs = self._group_attrs(target)
        if not attrs or attrs.get("complete") or attrs.get("provenance", {}).get("key", key) != key:
            return None
        return zarr.open_group(self._zarr_store(target, read_only=False), mode="r+")

    def _publish(self, temp: str, final: str) -> None:
        try:
            os.rename(temp, final)
        except OSError:
            # Another writer published the same key first; its output is equivalent, keep it.
            if self.is_complete(*_stage_and_key(final)):
                shutil.rmtree(temp, ignore_errors=True)
                return
            shutil.rmtree(final, ignore_errors=True)
            os.rename(temp, final)

    def remove(self, rel: str) -> None:
        """Unpublish, then delete: readers stop trusting the group before any chunk disappears.

        The artifact's pictures (``pictures/<stage>/<key>/``, shown in the Prefect UI) go with it.
        """
        if rel.startswith(f"{ARTIFACTS}/") and TEMP_MARK not in rel and TRASH_MARK not in rel:
            stage, key = _stage_and_key(rel)
            self._remove_abs(self.abspath(f"{PICTURES}/{stage}/{key}"))
        path = self.abspath(rel)
        if self.atomic_rename and os.path.isdir(path) and TRASH_MARK not in rel:
            trash = f"{path}{TRASH_MARK}{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            return
        if self.fs.exists(f"{path}/zarr.json"):
            self.fs.rm(f"{path}/zarr.json")
        self._remove_abs(path)

    def _remove_abs(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def _zarr_store(self, path: str, *, read_only: bool) -> LocalStore | FsspecStore:
        if self.atomic_rename:
            return LocalStore(path, read_only=read_only)
        return FsspecStore.from_url(
            self.fs.unstrip_protocol(path), storage_options=self.storage_options or None, read_only=read_only
        )

    # listing ---------------------------------------------------------------------------------

    def list(self, stage: str | None = None) -> Iterator[ArtifactInfo]:
        """Every artifact group, complete or not (temporary siblings excluded), oldest first."""
        pattern = self.abspath(f"{ARTIFACTS}/{stage or '*'}/*/*.zarr")
        infos = [self._info(path) for path in self.fs.glob(pattern)]
        yield from sorted((i for i in infos if i is not None), key=lambda i: i.created_at)

    def temporaries(self) -> list[tuple[str, float]]:
        """Relative paths of temporary write siblings with the unix time they were started."""
        found = []
        for path in self.fs.glob(self.abspath(f"{ARTIFACTS}/*/*/*.zarr{TEMP_MARK}*")):
            stamp = path.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0]
            found.append((self._relative(path), float(stamp) if stamp.isdigit() else self._touched(path)))
        return found

    def _touched(self, path: str) -> float:
        """When a resumable partial last finished a part (0 when unreadable: it is swept as stale)."""
        try:
            attrs = json.loads(self.fs.cat_file(f"{path}/zarr.json")).get("attributes", {})
        except (FileNotFoundError, ValueError):
            return 0.0
        return float(attrs.get("touched_at") or attrs.get("resumed_at") or attrs.get("started_at") or 0.0)

    def trash(self) -> list[str]:
        """Relative paths of groups a removal unpublished but did not finish deleting."""
        return [self._relative(p) for p in self.fs.glob(self.abspath(f"{ARTIFACTS}/*/*/*.zarr{TRASH_MARK}*"))]

    def find(self, key: str) -> ArtifactInfo:
        """Locate an artifact by its key or a unique prefix of it (at least 6 hex digits)."""
        if not re.fullmatch(r"[0-9a-f]{6,64}", key):
            raise ArtifactNotFound(f"{key!r} is not a stage key; give 6 to 64 lowercase hex digits")
        matches = [i for i in self.list() if i.key.startswith(key)]
        if len(matches) != 1:
            what = "no artifact" if not matches else f"{len(matches)} artifacts"
            raise ArtifactNotFound(f"{what} in {self.url!r} with a key starting {key!r}; give more digits or check --store")
        return matches[0]

    def size(self, rel: str) -> int:
        return int(self.fs.du(self.abspath(rel), total=True))

    def _info(self, path: str) -> ArtifactInfo | None:
        rel = self._relative(path)
        stage, key = _stage_and_key(path)
        try:
            attrs = self.read_attrs(rel)
        except ArtifactNotFound:
            return None
        created = float(attrs.get("completed_at") or attrs.get("touched_at") or attrs.get("started_at") or 0.0)
        return ArtifactInfo(stage, key, rel, self.url_of(rel), bool(attrs.get("complete")), created, attrs)

    def _relative(self, path: str) -> str:
        path = self.fs._strip_protocol(path)
        return path[len(self.root) :].lstrip("/")


def _stage_and_key(path: str) -> tuple[str, str]:
    parts = path.rstrip("/").split("/")
    return parts[-3], parts[-1].split(".zarr")[0]


def locate_artifact_url(url: str) -> tuple[str, str, str]:
    """Split an artifact URL into (store root, stage, key); ArtifactNotFound when it is not one."""
    match = _ARTIFACT_URL.match(url.rstrip("/"))
    if not match:
        raise ArtifactNotFound(
            f"{url!r} is not an artifact URL; expected <store>/artifacts/<stage>/<xx>/<key>.zarr"
        )
    return match["root"] or ".", match["stage"], match["key"]
