"""Progress of long stages: shown in the stage's card (updated in place, at a bounded rate) and logged
at every tenth of the work, so the run's log keeps its real messages.

Each card update is an API call, so updates closer than ``min_interval`` seconds are dropped; the
finished card replaces the last one. Outside a Prefect task run it only keeps count.

The stages computing in this process are also listed by :func:`running`, which the command line's live
display (``reelflow run``, ``demo``, ``bulk``, ``compare`` on a terminal) draws twice a second.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from prefect.context import TaskRunContext
from prefect.logging import get_run_logger


class Shows(Protocol):
    def show(self, markdown: str) -> None: ...


KEPT = 64  # progress of finished stages kept for the live display
_RUNNING: list[Progress] = []
_LOCK = threading.Lock()


def running() -> list[Progress]:
    """The progress of this process's stages, oldest first: those computing, then the last KEPT finished."""
    with _LOCK:
        return list(_RUNNING)


class Progress:
    def __init__(
        self, card: Shows | None = None, *, title: str = "", description: str = "", label: tuple[str, str, str] = ("", "", ""),
        min_interval: float = 2.0,
    ) -> None:  # fmt: skip
        self.card = card
        self.title = title
        self.description = description
        self.clip, self.pipeline, self.stage = label
        self.min_interval = min_interval
        self.total = 0
        self.done = 0
        self.unit = "steps"
        self.state = "running"  # then "done" or "failed"
        self._started = self._entered = time.monotonic()
        self._ended: float | None = None
        self._last = 0.0
        self._logged_tenth = -1
        self._enabled = TaskRunContext.get() is not None

    def __enter__(self) -> Progress:
        """Listed by :func:`running` until the block ends (as done, or failed if it raised)."""
        with _LOCK:
            _RUNNING.append(self)
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        self.state, self._ended = ("failed" if kind is not None else "done"), time.monotonic()
        with _LOCK:
            finished = [p for p in _RUNNING if p.state != "running"]
            for old in finished[: max(0, len(finished) - KEPT)]:
                _RUNNING.remove(old)

    def start(self, total: int, unit: str = "steps") -> None:
        self.total, self.done, self.unit = max(total, 1), 0, unit
        self._started = self._last = time.monotonic()
        self._logged_tenth = 0
        if self._enabled and self.card is not None:
            self.card.show(self._markdown())

    def advance(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        if not self._enabled:
            return
        tenth = int(10 * self.done / self.total)
        if tenth > self._logged_tenth:
            self._logged_tenth = tenth
            get_run_logger().info("%s: %s", self.description, self.status())
        if self.card is not None and time.monotonic() - self._last >= self.min_interval:
            self._last = time.monotonic()
            self.card.show(self._markdown())

    def finish(self) -> None:
        if self.total:
            self.done = self.total

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0

    @property
    def seconds(self) -> float:
        """Since the stage started (to when it finished, once it has)."""
        return (self._ended or time.monotonic()) - self._entered

    def status(self) -> str:
        """``27/50 steps (54%), 3.1 steps/s, about 8 s left``."""
        elapsed = time.monotonic() - self._started
        text = f"{self.done}/{self.total} {self.unit} ({self.percent:.0f}%)"
        if self.done and elapsed > 0:
            rate = self.done / elapsed
            text += f", {rate:.3g} {self.unit}/s, about {(self.total - self.done) / rate:.0f} s left"
        return text

    def _markdown(self) -> str:
        return f"{self.title}\n\n**running**: {self.status()}"
