"""Whole-file writes to any fsspec URL: outputs and run manifests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem


def write_bytes(
    url: str, data: bytes, storage_options: Mapping[str, Any] | None = None, *, content_type: str | None = None
) -> str:
    """Write ``data`` to ``url`` so readers see the old file or the new one, never half of it.

    Local disks: a temporary sibling, then ``os.replace``. Object stores: one PUT, atomic per object,
    with ``content_type`` on S3 (so a presigned link to an HTML file opens it rather than downloading it).
    Returns the written path (local) or URL.
    """
    fs, path = fsspec.url_to_fs(url, **dict(storage_options or {}))
    put_atomic(fs, path, data, content_type=content_type)
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def options_for(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The storage options that apply to ``url``: none for local paths, which fsspec would reject."""
    return {} if is_local(url) else dict(storage_options or {})


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """``fsspec.url_to_fs`` of ``url`` (made absolute if local) with the options that apply to it."""
    return fsspec.url_to_fs(normalize_url(url), **options_for(url, storage_options))


def put_atomic(fs: AbstractFileSystem, path: str, data: bytes, *, content_type: str | None = None) -> None:
    """Write one whole file on ``fs``: temp + ``os.replace`` locally, a single PUT elsewhere."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        temp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.remove(temp)
        return
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if content_type and {"s3", "s3a"} & set(protocols):
        fs.pipe_file(path, data, ContentType=content_type)
    else:
        fs.pipe_file(path, data)


def normalize_url(url: str) -> str:
    """An absolute local path for a plain path or ``file://`` URL; any other URL unchanged."""
    url = str(url)
    if "://" not in url or url.startswith("file://"):
        return os.path.abspath(url.removeprefix("file://"))
    return url.rstrip("/")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
