"""Stage keys change exactly when what determines the output changes."""

from __future__ import annotations

import math
from pathlib import Path

import fsspec
import numpy as np
import pytest

from reelflow.storage.arrays import frame_chunks, storage_dtype
from reelflow.storage.keys import canonical_json, content_key, stage_key

BASE = dict(
    stage="encode_latents",
    version="1",
    params={"chunk_size": 8, "sample": False},
    models={"model": "local:abc|float32"},
    inputs={"frames": "f" * 64},
    seed=None,
)


def test_key_is_stable_and_hex() -> None:
    key = stage_key(**BASE)
    assert key == stage_key(**BASE)
    assert len(key) == 64 and int(key, 16) >= 0


def test_param_order_does_not_matter() -> None:
    reordered = {**BASE, "params": {"sample": False, "chunk_size": 8}}
    assert stage_key(**reordered) == stage_key(**BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"stage": "decode_latents"},
        {"version": "2"},
        {"params": {"chunk_size": 4, "sample": False}},
        {"models": {"model": "local:abd|float32"}},
        {"models": {"model": "local:abc|float16"}},
        {"inputs": {"frames": "e" * 64}},
        {"inputs": {"pixels": "f" * 64}},
        {"seed": 0},
    ],
)
def test_any_identity_change_changes_the_key(change: dict) -> None:
    assert stage_key(**{**BASE, **change}) != stage_key(**BASE)


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": math.nan})


def test_content_key_tracks_bytes(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 10_000_000)
    b.write_bytes(b"x" * 10_000_000)
    assert content_key(fs, str(a)) == content_key(fs, str(b))
    b.write_bytes(b"x" * 9_999_999 + b"y")
    assert content_key(fs, str(a)) != content_key(fs, str(b))


def test_frame_chunks() -> None:
    assert frame_chunks((100, 3, 512, 512), 1) == (1, 3, 512, 512)
    assert frame_chunks((100, 4, 8, 8), 2) == (100, 4, 8, 8)
    assert frame_chunks((3,), 8) == (3,)


def test_storage_dtype_policy() -> None:
    latents = np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32)
    assert storage_dtype(latents) == np.float16
    assert storage_dtype(latents * 1e6) == np.float32, "past float16's range"
    assert storage_dtype(np.array([1.0, np.inf], np.float32)) == np.float32
    assert storage_dtype(np.arange(5, dtype=np.uint8)) == np.uint8
