"""Garbage collection: drop old artifacts, keep the store under a size budget, sweep crashed writes.

Never touches an artifact that a live run holds or is computing (see storage.leases).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from reelflow.storage.leases import Leases
from reelflow.storage.store import ArtifactInfo, ArtifactStore

STALE_TEMP_SECONDS = 6 * 3600


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_held: list[str] = field(default_factory=list)
    remaining_bytes: int = 0
    dry_run: bool = False


def collect_garbage(
    store: ArtifactStore,
    *,
    older_than: float | None = None,
    max_bytes: int | None = None,
    stale_after: float = STALE_TEMP_SECONDS,
    dry_run: bool = False,
) -> GcReport:
    """Remove artifacts older than ``older_than`` seconds, then the oldest until the total fits ``max_bytes``.

    Temporary write siblings and unfinished groups older than ``stale_after`` seconds are swept too:
    they are what a killed writer leaves behind.
    """
    leases = Leases(store)
    protected = leases.held_keys() | leases.live_keys()
    report = GcReport(dry_run=dry_run)
    now = time.time()
    artifacts = list(store.list())
    _sweep_unfinished(store, artifacts, protected, now - stale_after, report)
    complete = [a for a in artifacts if a.complete]
    sizes = {a.path: store.size(a.path) for a in complete}
    keep = []
    for info in complete:
        expired = older_than is not None and info.created_at < now - older_than
        if expired and not _held(info, _protected(leases, protected, report), report):
            _drop(store, info.path, sizes[info.path], report)
        else:
            keep.append(info)
    _fit_budget(store, keep, sizes, max_bytes, leases, protected, report)
    report.kept_held = sorted(set(report.kept_held))
    if not dry_run:
        leases.sweep_expired()
    return report


def _sweep_unfinished(
    store: ArtifactStore, artifacts: list[ArtifactInfo], protected: set[str], cutoff: float, report: GcReport
) -> None:
    for rel in store.trash():
        _drop(store, rel, store.size(rel), report)
    for rel, started in store.temporaries():
        key = rel.rsplit("/", 1)[1].split(".zarr")[0]
        if started < cutoff and key not in protected:
            _drop(store, rel, store.size(rel), report)
    for info in artifacts:
        if not info.complete and info.created_at < cutoff and info.key not in protected:
            _drop(store, info.path, store.size(info.path), report)


def _fit_budget(
    store: ArtifactStore,
    keep: list[ArtifactInfo],
    sizes: dict[str, int],
    max_bytes: int | None,
    leases: Leases,
    protected: set[str],
    report: GcReport,
) -> None:
    total = sum(sizes[a.path] for a in keep)
    for info in keep:  # oldest first
        if max_bytes is None or total <= max_bytes:
            break
        if not _held(info, _protected(leases, protected, report), report):
            _drop(store, info.path, sizes[info.path], report)
            total -= sizes[info.path]
    report.remaining_bytes = total


def _protected(leases: Leases, snapshot: set[str], report: GcReport) -> set[str]:
    """Holds and leases read again right before a deletion, so a run that started after GC did is safe."""
    return snapshot if report.dry_run else snapshot | leases.held_keys() | leases.live_keys()


def _held(info: ArtifactInfo, protected: set[str], report: GcReport) -> bool:
    if info.key in protected:
        report.kept_held.append(info.path)
        return True
    return False


def _drop(store: ArtifactStore, rel: str, size: int, report: GcReport) -> None:
    report.removed.append(rel)
    report.freed_bytes += size
    if not report.dry_run:
        store.remove(rel)
