"""Progress of long stages: shown in the stage's card (updated in place, at a bounded rate) and logged
at every tenth of the work, so the run's log keeps its real messages.

Each card update is an API call, so updates closer than ``min_interval`` seconds are dropped; the
finished card replaces the last one. Outside a Prefect task run it only keeps count.
"""

from __future__ import annotations

import time
from typing import Protocol

from prefect.context import TaskRunContext
from prefect.logging import get_run_logger


class Shows(Protocol):
    def show(self, markdown: str) -> None: ...


class Progress:
    def __init__(self, card: Shows | None = None, *, title: str = "", description: str = "", min_interval: float = 2.0) -> None:
        self.card = card
        self.title = title
        self.description = description
        self.min_interval = min_interval
        self.total = 0
        self.done = 0
        self.unit = "steps"
        self._started = 0.0
        self._last = 0.0
        self._logged_tenth = -1
        self._enabled = TaskRunContext.get() is not None

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
