"""Whole-file writes to any fsspec URL: outputs and run manifests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def write_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``data`` to ``url`` so readers see the old file or the new one, never half of it.

    Local disks: a temporary sibling, then ``os.replace``. Object stores: one PUT, atomic per object.
    Returns the written path (local) or URL.
    """
    fs, path = fsspec.url_to_fs(url, **dict(storage_options or {}))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        temp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(temp, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
        return path
    fs.pipe_file(path, data)
    return fs.unstrip_protocol(path)


def join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"
