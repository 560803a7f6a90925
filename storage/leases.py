"""Expiring leases in the store, so crashed runs never block anyone for long.

- A *compute lease* (``leases/{key}.json``) says one run is computing that stage key. Others wait
  for the artifact or the lease's expiry, so two runs that need the same key compute it once.
- A *hold* (``holds/{run_id}.json``) lists the keys a running edit reads or writes; garbage
  collection never touches them.

Both carry an absolute expiry and are renewed by their owner while it lives. Exclusive creation
(``open(..., "xb")``, an ``If-None-Match`` PUT on S3) decides who gets a free lease; a lease past its
expiry may be taken over, so a SIGKILLed holder delays others by at most one lease period.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from storage.store import ArtifactStore

LEASES = "leases"
HOLDS = "holds"


@dataclass(frozen=True)
class Lease:
    key: str
    holder: str
    expires_at: float
    host: str = ""
    pid: int = 0

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
            renew()

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

    def _lease_path(self, key: str) -> str:
        return self.store.abspath(f"{LEASES}/{key}.json")

    def acquire(self, key: str, holder: str, ttl: float) -> bool:
        """Take the lease on ``key`` if it is free or expired; True when ``holder`` now owns it."""
        current = self.read(key)
        if current is not None and current.holder == holder:
            return self.renew(key, holder, ttl)
        if current is not None and current.live():
            return False
        if current is not None:
            self._remove(self._lease_path(key))
        return self._create(self._lease_path(key), self._lease(key, holder, ttl))

    def renew(self, key: str, holder: str, ttl: float) -> bool:
        current = self.read(key)
        if current is None or current.holder != holder:
            return False
        self.fs.pipe_file(self._lease_path(key), _dump(self._lease(key, holder, ttl)))
        return True

    def release(self, key: str, holder: str) -> None:
        current = self.read(key)
        if current is not None and current.holder == holder:
            self._remove(self._lease_path(key))

    def read(self, key: str) -> Lease | None:
        record = _load(self.fs, self._lease_path(key))
        return _as_lease(record) if record else None

    def live_keys(self) -> set[str]:
        return {lease.key for lease in self._all(LEASES) if lease.live()}

    # holds -----------------------------------------------------------------------------------

    def hold(self, run_id: str, keys: Iterable[str], ttl: float) -> None:
        """Protect ``keys`` from garbage collection for ``ttl`` seconds (call again to renew)."""
        record = {**asdict(self._lease(run_id, run_id, ttl)), "keys": sorted(set(keys))}
        self.fs.makedirs(self.store.abspath(HOLDS), exist_ok=True)
        self.fs.pipe_file(self.store.abspath(f"{HOLDS}/{run_id}.json"), json.dumps(record).encode())

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

    def held_keys(self) -> set[str]:
        keys: set[str] = set()
        for path in self.fs.glob(self.store.abspath(f"{HOLDS}/*.json")):
            record = _load(self.fs, path)
            if record and _as_lease(record).live():
                keys.update(record.get("keys", []))
        return keys

    def sweep_expired(self) -> int:
        """Delete expired leases and holds; returns how many were removed."""
        removed = 0
        for folder in (LEASES, HOLDS):
            for path in self.fs.glob(self.store.abspath(f"{folder}/*.json")):
                record = _load(self.fs, path)
                if record is None or not _as_lease(record).live():
                    self._remove(path)
                    removed += 1
        return removed

    # internals -------------------------------------------------------------------------------

    def _lease(self, key: str, holder: str, ttl: float) -> Lease:
        return Lease(key=key, holder=holder, expires_at=time.time() + ttl, host=socket.gethostname(), pid=os.getpid())

    def _create(self, path: str, lease: Lease) -> bool:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            with self.fs.open(path, "xb") as handle:
                handle.write(_dump(lease))
        except FileExistsError:
            return False
        return True

    def _all(self, folder: str) -> list[Lease]:
        leases = []
        for path in self.fs.glob(self.store.abspath(f"{folder}/*.json")):
            record = _load(self.fs, path)
            if record:
                leases.append(_as_lease(record))
        return leases

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass


def _as_lease(record: dict) -> Lease:
    return Lease(**{k: record[k] for k in ("key", "holder", "expires_at", "host", "pid") if k in record})


def _dump(lease: Lease) -> bytes:
    return json.dumps(asdict(lease)).encode()


def _load(fs, path: str) -> dict | None:  # noqa: ANN001
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
