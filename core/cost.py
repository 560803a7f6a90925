"""What a stage costs in memory: the peak resident memory of the worker process while the stage runs, and on CUDA
the peak GPU memory torch allocated.

A process's own peak (``ru_maxrss``) never goes down, so it cannot tell one stage from the one before; here a
daemon thread samples the resident size every ``interval`` seconds (and at entry and exit) and keeps the
largest. It is the process's: stages that run at once in one worker (``REELFLOW_MAX_CONCURRENCY`` above 1)
are counted together, and a spike shorter than the interval can be missed. On CUDA the peak is torch's
``max_memory_allocated`` since the stage began, for the current device.
"""

from __future__ import annotations

import threading
from types import TracebackType

import psutil
import torch


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.rss`` (bytes) and ``peak.gpu`` (bytes, None without CUDA)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.rss = 0
        self.gpu: int | None = None
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="reelflow-peak-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self._take()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._take()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.gpu = int(torch.cuda.max_memory_allocated())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def _take(self) -> None:
        self.rss = max(self.rss, int(self._process.memory_info().rss))
