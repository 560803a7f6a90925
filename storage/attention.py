"""The attention store: FateZero's inversion-time attention maps, streamed into Zarr.

One float16 array per layer, ``attention/{layer}`` of shape ``(steps, F, H, Nq, Nk)`` with one chunk
per step and layer, so a step is written once, by one writer, as soon as the UNet produced it, and
read back as one chunk per layer. Maps are float16, Blosc-LZ4 with bit shuffling. Writes go through a bounded background queue so compression and
I/O overlap the next UNet call; reads prefetch the next step the edit will ask for.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import zarr

from reelflow.storage.store import ArtifactWriter

ATTENTION = "attention"
# Bit-shuffled LZ4 in Blosc: on float16 softmax maps both faster and smaller than plain zstd
# (measured in benchmarks/attention_store.py), and a standard Zarr v3 codec every reader has.
MAP_CODEC = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


def _dims(shape: tuple[int, ...]) -> tuple[str, ...]:
    """Dimension names of a layer's ``(steps, F, H, Nq, Nk)`` array. Heads, queries and keys differ between
    layers, so their names carry their sizes: the ``attention`` group then opens as one xarray Dataset."""
    _, _, heads, queries, keys = shape
    return ("step", "frame", f"head_{heads}", f"query_{queries}", f"key_{keys}")


class AttentionWriter:
    """Streams ``(F, H, Nq, Nk)`` maps of (step, layer) into the artifact being written."""

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

    def write(self, step: int, layer: str, is_cross: bool, probs: np.ndarray) -> None:
        """Queue one map; blocks when the writer is ``queue_size`` maps behind (memory stays bounded)."""
        if self._error is not None:
            raise self._error
        if layer not in self.layers:
            self.layers[layer] = {"is_cross": is_cross, "query_len": int(probs.shape[2]), "shape": list(probs.shape)}
        self._queued += 1
        self._step_queued[step] = self._queued
        self._queue.put((step, layer, probs.astype(np.float16, copy=False)))

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
            step, layer, probs = item
            try:
                started = time.perf_counter()
                self._array(layer, probs.shape)[step] = probs
                self.write_seconds += time.perf_counter() - started
                self.raw_bytes += probs.size * 4  # what the same map costs as float32
                self._written += 1
            except BaseException as exc:  # noqa: BLE001  (surfaced to the producer by write/close)
                self._error = exc

    def _array(self, layer: str, shape: tuple[int, ...]) -> zarr.Array:
        if layer not in self._arrays:
            self._arrays[layer] = self.writer.create_array(
                f"{ATTENTION}/{layer}",
                shape=(self.num_steps, *shape),
                dtype=np.float16,
                dims=_dims((self.num_steps, *shape)),
                chunks=(1, *shape),
                compressor=MAP_CODEC,
                attrs=self.layers[layer],
            )
        return self._arrays[layer]


def _stored_layers(writer: ArtifactWriter) -> dict[str, dict[str, Any]]:
    """The layers an earlier attempt of a resumed write recorded, from their arrays' attrs."""
    if ATTENTION not in writer.group:
        return {}
    return {name: dict(array.attrs) for name, array in writer.group[ATTENTION].arrays() if "is_cross" in array.attrs}


class AttentionReader:
    """Reads the maps of every layer recorded at one step, prefetching the next step of ``order``."""

    def __init__(
        self,
        group: zarr.Group,
        recorded: Mapping[str, Sequence[int]],
        order: Sequence[int],
        transform: Callable[[np.ndarray], Any] = lambda maps: maps,
    ) -> None:
        """``recorded``: layer -> the steps it was recorded at. ``transform`` runs in the prefetch thread on
        each map (e.g. into pinned host memory)."""
        self.arrays = {name: group[f"{ATTENTION}/{name}"] for name in recorded}
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
        maps = {
            name: self.transform(np.asarray(array[step]))
            for name, array in self.arrays.items()
            if step in self.layer_steps[name]
        }
        self.read_seconds += time.perf_counter() - started
        return maps
