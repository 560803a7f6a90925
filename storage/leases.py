"""Expiring leases in the store, so crashed runs never block anyone for long.

- A *compute lease* says one run is computing a stage key. Others wait for the artifact or the
  lease's expiry, so two runs that need the same key compute it once.
- A *hold* (``holds/{run_id}.json``) lists the keys a running edit reads or writes; garbage
  collection never touches them.

Leases are generations: ``leases/{key}/{generation}.json``; the highest generation is the lease.
Taking a free or expired lease means creating the next generation with an exclusive create
(``os.link`` of a finished temporary file locally, an ``If-None-Match`` PUT on S3), so of two runs
that both see an expired lease exactly one wins, and no reader ever sees a half-written file.
The holder renews its own generation in place (atomically) while it works; a lease is dead once
it expires, or at once when its holder ran on this host and that process is gone.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from fsspec.implementations.local import LocalFileSystem

from reelflow.storage.files import put_atomic
from reelflow.storage.store import ArtifactStore

LEASES = "leases"
HOLDS = "holds"


@dataclass(frozen=True)
class Lease:
    key: str
    holder: str
    expires_at: float
    host: str = ""
    pid: int = 0
    generation: int = 0

    def live(self, now: float | None = None) -> bool:
        """Unexpired, and, when the holder ran on this host, its process still exists."""
        if self.expires_at <= (time.time() if now is None else now):
            return False
        return not (self.host == socket.gethostname() and self.pid and not _process_exists(self.pid))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@contextmanager
def renewing(renew: Callable[[], object], interval: float) -> Iterator[None]:
    """Call ``renew`` every ``interval`` seconds from a daemon thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            try:
                renew()
            except Exception:  # noqa: BLE001  (a failed renewal is retried at the next tick)
                continue

    thread = threading.Thread(target=loop, name="reelflow-lease-renewal", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class Leases:
    """Compute leases and run holds of one store."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self.fs = store.fs

    def _dir(self, key: str) -> str:
        return self.store.abspath(f"{LEASES}/{key}")

    def _generation_path(self, key: str, generation: int) -> str:
        return f"{self._dir(key)}/{generation:012d}.json"

    def acquire(self, key: str, holder: str, ttl: float) -> bool:
        """Take the lease on ``key`` if it is free or dead; True when ``holder`` now owns it."""
        top = max(self._generations(key), default=0)
        current = self.read(key)
        if current is not None and current.holder == holder:
            return self.renew(key, holder, ttl)
        if current is not None and current.live():
            return False
        # The next generation after every one listed: if a lower one vanished while we read it,
        # another run has just taken over, and our exclusive create of its generation fails.
        generation = max(top, current.generation if current else 0) + 1
        if not self._create(self._generation_path(key, generation), self._lease(key, holder, ttl, generation)):
            return False
        self._drop_generations_below(key, generation)
        return True

    def renew(self, key: str, holder: str, ttl: float) -> bool:
        """Extend the holder's lease; False when the lease is no longer the holder's."""
        current = self.read(key)
        if current is None or current.holder != holder:
            return False
        lease = self._lease(key, holder, ttl, current.generation)
        put_atomic(self.fs, self._generation_path(key, current.generation), _dump(lease))
        return True

    def release(self, key: str, holder: str) -> None:
        current = self.read(key)
        if current is not None and current.holder == holder:
            self._remove(self._generation_path(key, current.generation))

    def read(self, key: str) -> Lease | None:
        """The current (highest-generation) lease on ``key``, live or not."""
        paths = sorted(self.fs.glob(f"{self._dir(key)}/*.json"))
        for path in reversed(paths):
            record = _load(self.fs, path)
            if record is not None:
                return _as_lease(record)
        return None

    def live_keys(self) -> set[str]:
        keys = {path.rstrip("/").rsplit("/", 1)[1] for path in self.fs.glob(self.store.abspath(f"{LEASES}/*"))}
        return {key for key in keys if (lease := self.read(key)) is not None and lease.live()}

    # holds -----------------------------------------------------------------------------------

    def hold(self, run_id: str, keys: Iterable[str], ttl: float) -> None:
        """Protect ``keys`` from garbage collection for ``ttl`` seconds (call again to renew)."""
        record = {**asdict(self._lease(run_id, run_id, ttl, 0)), "keys": sorted(set(keys))}
        put_atomic(self.fs, self.store.abspath(f"{HOLDS}/{run_id}.json"), json.dumps(record).encode())

    @contextmanager
    def holding(self, run_id: str, keys: Iterable[str], ttl: float) -> Iterator[None]:
        """Hold ``keys`` for the duration of the block, renewed at a third of ``ttl``."""
        keys = sorted(set(keys))
        self.hold(run_id, keys, ttl)
        try:
            with renewing(lambda: self.hold(run_id, keys, ttl), ttl / 3):
                yield
        finally:
            self.release_hold(run_id)

    def release_hold(self, run_id: str) -> None:
        self._remove(self.store.abspath(f"{HOLDS}/{run_id}.json"))

    def _live_holds(self) -> Iterator[dict]:
        for path in self.fs.glob(self.store.abspath(f"{HOLDS}/*.json")):
            record = _load(self.fs, path)
            if record and _as_lease(record).live():
                yield record

    def held_keys(self) -> set[str]:
        return {key for record in self._live_holds() for key in record.get("keys", [])}

    def holders(self, key: str) -> list[str]:
        """Run ids of the live holds on ``key``."""
        return sorted(record["holder"] for record in self._live_holds() if key in record.get("keys", []))

    def sweep_expired(self) -> int:
        """Delete dead leases and holds; returns how many files were removed."""
        removed = 0
        for path in self.fs.glob(self.store.abspath(f"{LEASES}/*/*.json")):
            key = path.rsplit("/", 2)[1]
            lease = self.read(key)
            if lease is None or not lease.live():
                self._remove(path)
                removed += 1
        for path in self.fs.glob(self.store.abspath(f"{HOLDS}/*.json")):
            record = _load(self.fs, path)
            if record is None or not _as_lease(record).live():
                self._remove(path)
                removed += 1
        return removed

    # internals -------------------------------------------------------------------------------

    def _lease(self, key: str, holder: str, ttl: float, generation: int) -> Lease:
        return Lease(key, holder, time.time() + ttl, socket.gethostname(), os.getpid(), generation)

    def _create(self, path: str, lease: Lease) -> bool:
        """Create ``path`` holding the lease, only if it does not exist; readers never see it half-written."""
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            temp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(temp, "wb") as handle:
                handle.write(_dump(lease))
            try:
                os.link(temp, path)
            except FileExistsError:
                return False
            finally:
                os.remove(temp)
            return True
        try:
            with self.fs.open(path, "xb") as handle:
                handle.write(_dump(lease))
        except FileExistsError:
            return False
        return True

    def _generations(self, key: str) -> list[int]:
        return [int(path.rsplit("/", 1)[1].split(".")[0]) for path in self.fs.glob(f"{self._dir(key)}/*.json")]

    def _drop_generations_below(self, key: str, generation: int) -> None:
        for old in self._generations(key):
            if old < generation:
                self._remove(self._generation_path(key, old))

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass


def _as_lease(record: dict) -> Lease:
    fields = ("key", "holder", "expires_at", "host", "pid", "generation")
    return Lease(**{k: record[k] for k in fields if k in record})


def _dump(lease: Lease) -> bytes:
    return json.dumps(asdict(lease)).encode()


def _load(fs, path: str) -> dict | None:  # noqa: ANN001
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
