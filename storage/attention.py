"""The attention store: what FateZero's inversion records of each attention layer, streamed into Zarr.

A cross-attention layer keeps its maps, ``attention/{layer}`` of shape ``(steps, F, H, Nq, 77)``. A
self-attention layer keeps what its maps are computed from, never the ``Nq x Nk`` maps themselves:
``queries/{layer}`` ``(steps, F, H, Nq, d)`` and ``keys/{layer}`` ``(steps, U, H, Nq, d)``, the keys of
the ``U`` key frames only, with the key frames and each frame's ``frame_indices`` in the layer's attrs.
One chunk per step and array, so a step is written once, by one writer, as soon as the UNet produced
it, and read back as one chunk per array. Everything is float16, Blosc-LZ4 with bit shuffling. Writes
go through a bounded background queue so compression and I/O overlap the next UNet call; reads
prefetch the next step the edit will ask for.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dataclasses import dataclass

import numpy as np
import zarr

from reelflow.storage.store import ArtifactWriter

ATTENTION, QUERIES, KEYS = "attention", "queries", "keys"
# Bit-shuffled LZ4 in Blosc: on float16 softmax maps both faster and smaller than plain zstd
# (measured in benchmarks/attention_store.py), and a standard Zarr v3 codec every reader has.
MAP_CODEC = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


def _dims(group: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    """Dimension names of a layer's array. Heads, tokens and channels differ between layers, so their names
    carry their sizes: each of ``attention``, ``queries`` and ``keys`` then opens as one xarray Dataset."""
    _, frames, heads, queries, last = shape
    if group == ATTENTION:
        return ("step", "frame", f"head_{heads}", f"query_{queries}", f"key_{last}")
    first = "frame" if group == QUERIES else f"key_frame_{frames}"
    return ("step", first, f"head_{heads}", f"token_{queries}", f"channel_{last}")


@dataclass(frozen=True)
class StoredTokens:
    """A self-attention layer's record of one step: every frame's queries, the key frames' keys.

    ``query`` ``(F, H, Nq, d)``, ``key`` ``(U, H, Nq, d)`` for the frames ``key_frames`` (ascending),
    and ``frame_indices`` ``(F, K)``: the key frames of every frame.
    """

    query: Any
    key: Any
    key_frames: list[int]
    frame_indices: list[list[int]]


class AttentionWriter:
    """Streams what (step, layer) recorded, maps ``(F, H, Nq, Nk)`` or :class:`StoredTokens`, into the artifact."""

    def __init__(self, writer: ArtifactWriter, num_steps: int, *, queue_size: int = 8) -> None:
        self.writer = writer
        self.num_steps = num_steps
        self.layers: dict[str, dict[str, Any]] = _stored_layers(writer) if writer.resumed_parts else {}
        self.raw_bytes = 0
        self.write_seconds = 0.0
        self._arrays: dict[str, zarr.Array] = {}
        self._queued = 0  # maps queued so far, and the count when each step's last map was queued
        self._written = 0
        self._step_queued: dict[int, int] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="reelflow-attention-writer", daemon=True)
        self._thread.start()

    def write(self, step: int, layer: str, is_cross: bool, recorded: Any) -> None:
        """Queue one layer's record, maps or :class:`StoredTokens` of host arrays (numpy, or anything
        ``np.asarray`` reads, such as CPU tensors; cast to float16 in the writer's thread). Blocks when the
        writer is ``queue_size`` records behind, so memory stays bounded."""
        if self._error is not None:
            raise self._error
        if layer not in self.layers:
            self.layers[layer] = _layer_info(is_cross, recorded)
        self._queued += 1
        self._step_queued[step] = self._queued
        self._queue.put((step, layer, recorded))

    def flushed(self, step: int) -> bool:
        """Whether every map of ``step`` queued so far is in the store (true for a step that recorded none)."""
        return self._written >= self._step_queued.get(step, 0)

    def close(self) -> None:
        """Wait for every queued map to be written; re-raise a write error."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Drop what is still queued and stop the thread (the artifact is about to be discarded)."""
        self._error = self._error or RuntimeError("attention writer aborted")
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            step, layer, recorded = item
            try:
                started = time.perf_counter()
                arrays = [(QUERIES, recorded.query), (KEYS, recorded.key)] if isinstance(recorded, StoredTokens) else [
                    (ATTENTION, recorded)]  # fmt: skip
                for group, data in arrays:
                    data = np.asarray(data).astype(np.float16, copy=False)
                    self._array(group, layer, data.shape)[step] = data
                    self.raw_bytes += data.size * 4  # what the same values cost as float32
                self.write_seconds += time.perf_counter() - started
                self._written += 1
            except BaseException as exc:  # noqa: BLE001  (surfaced to the producer by write/close)
                self._error = exc

    def _array(self, group: str, layer: str, shape: tuple[int, ...]) -> zarr.Array:
        name = f"{group}/{layer}"
        if name not in self._arrays:
            self._arrays[name] = self.writer.create_array(
                name,
                shape=(self.num_steps, *shape),
                dtype=np.float16,
                dims=_dims(group, (self.num_steps, *shape)),
                chunks=(1, *shape),
                compressor=MAP_CODEC,
                attrs=self.layers[layer],
            )
        return self._arrays[name]


def _layer_info(is_cross: bool, recorded: Any) -> dict[str, Any]:
    if isinstance(recorded, StoredTokens):
        return {"is_cross": False, "query_len": int(recorded.query.shape[2]), "shape": [int(n) for n in recorded.query.shape],
                "stored": "tokens", "key_frames": list(recorded.key_frames), "frame_indices": recorded.frame_indices}  # fmt: skip
    return {"is_cross": is_cross, "query_len": int(recorded.shape[2]), "shape": [int(n) for n in recorded.shape], "stored": "maps"}


def _stored_layers(writer: ArtifactWriter) -> dict[str, dict[str, Any]]:
    """The layers an earlier attempt of a resumed write recorded, from their arrays' attrs."""
    return {
        name: dict(array.attrs)
        for group in (ATTENTION, QUERIES)
        if group in writer.group
        for name, array in writer.group[group].arrays()
        if "is_cross" in array.attrs
    }


class AttentionReader:
    """Reads what every layer recorded at one step, prefetching the next step of ``order``: maps for
    cross-attention layers, :class:`StoredTokens` for self-attention layers."""

    def __init__(
        self,
        group: zarr.Group,
        recorded: Mapping[str, Sequence[int]],
        order: Sequence[int],
        transform: Callable[[np.ndarray], Any] = lambda maps: maps,
    ) -> None:
        """``recorded``: layer -> the steps it was recorded at. ``transform`` runs in the prefetch thread on
        each array read (e.g. into pinned host memory)."""
        self.arrays = {name: _layer_arrays(group, name) for name in recorded}
        self.transform = transform
        self.layer_steps = {name: set(steps) for name, steps in recorded.items()}
        self.recorded = set().union(*self.layer_steps.values()) if self.layer_steps else set()
        self.order = list(order)
        self.read_seconds = 0.0  # spent reading, mostly in the background
        self.wait_seconds = 0.0  # the edit actually waited for maps
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reelflow-attention-prefetch")
        self._pending: dict[int, Future] = {}

    def __call__(self, step: int) -> Mapping[str, Any]:
        if step not in self.recorded:
            raise KeyError(f"inversion step {step} was not recorded (recorded: {min(self.recorded)}..{max(self.recorded)})")
        future = self._pending.pop(step, None) or self._pool.submit(self._load, step)
        started = time.perf_counter()
        maps = future.result()
        self.wait_seconds += time.perf_counter() - started
        self._prefetch_after(step)
        return maps

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> AttentionReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _prefetch_after(self, step: int) -> None:
        position = self.order.index(step) if step in self.order else -1
        if 0 <= position < len(self.order) - 1:
            upcoming = self.order[position + 1]
            if upcoming not in self._pending:
                self._pending[upcoming] = self._pool.submit(self._load, upcoming)

    def _load(self, step: int) -> dict[str, Any]:
        started = time.perf_counter()
        maps = {name: self._read(arrays, step) for name, arrays in self.arrays.items() if step in self.layer_steps[name]}
        self.read_seconds += time.perf_counter() - started
        return maps

    def _read(self, arrays: zarr.Array | tuple[zarr.Array, zarr.Array], step: int) -> Any:
        if not isinstance(arrays, tuple):
            return self.transform(np.asarray(arrays[step]))
        queries, keys = arrays
        return StoredTokens(self.transform(np.asarray(queries[step])), self.transform(np.asarray(keys[step])),
                            list(queries.attrs["key_frames"]), list(queries.attrs["frame_indices"]))  # fmt: skip


def _layer_arrays(group: zarr.Group, name: str) -> zarr.Array | tuple[zarr.Array, zarr.Array]:
    if f"{QUERIES}/{name}" in group:
        return group[f"{QUERIES}/{name}"], group[f"{KEYS}/{name}"]
    return group[f"{ATTENTION}/{name}"]
