"""Content-addressed identity: stage keys and source-file content keys.

A stage key is the sha256 of what determines the stage's output (Hamilton's rule: stage name +
code version + params + the data versions of its inputs), so it is both the cache key and the
storage path. Any change to a stage's params, version, models or inputs changes its key and,
through the input keys, the key of every stage downstream.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from fsspec import AbstractFileSystem

# 2: stages are keyed by (stage, method), models by role, and sources by slot.
KEY_SCHEMA = "reelflow-stage-key/2"
_READ_BLOCK = 8 << 20


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace; NaN is refused since it has no canonical form."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def stage_key(
    *,
    stage: str,
    method: str | None = None,
    version: str,
    params: Mapping[str, Any],
    models: Mapping[str, str],
    inputs: Mapping[str, str],
    seed: int | None,
) -> str:
    """sha256 hex of a stage's identity. ``models`` maps role -> fingerprint, ``inputs`` slot -> input key
    (a named source's slot as ``source:<slot>`` -> the hash of its bytes)."""
    identity = {
        "schema": KEY_SCHEMA,
        "stage": stage,
        "method": method,
        "version": version,
        "params": params,
        "models": dict(models),
        "inputs": dict(inputs),
        "seed": seed,
    }
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def content_key(fs: AbstractFileSystem, path: str) -> str:
    """sha256 hex over a file's size and bytes, streamed so memory stays flat for large videos."""
    digest = hashlib.sha256()
    digest.update(f"size:{fs.size(path)};".encode())
    with fs.open(path, "rb") as handle:
        while block := handle.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()
