"""Progress of long stages as a Prefect progress artifact, updated at a bounded rate.

Each update is an API call, so updates closer than ``min_interval`` seconds are dropped (the last
one always goes through). Outside a Prefect task run (``task.fn()`` in tests, a plain loop) it only
keeps count.
"""

from __future__ import annotations

import re
import time
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger


class Progress:
    def __init__(self, name: str, *, description: str = "", min_interval: float = 1.0) -> None:
        self.key = "progress-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
        self.description = description
        self.min_interval = min_interval
        self.total = 0
        self.done = 0
        self._artifact: UUID | None = None
        self._last = 0.0
        self._enabled = TaskRunContext.get() is not None

    def start(self, total: int) -> None:
        self.total, self.done = max(total, 1), 0
        if self._enabled:
            self._artifact = create_progress_artifact(0.0, key=self.key, description=self.description)
            self._last = time.monotonic()

    def advance(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        if self._artifact is not None and time.monotonic() - self._last >= self.min_interval:
            self._publish()

    def finish(self) -> None:
        if self._artifact is not None:
            self.done = self.total
            self._publish()

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0

    def _publish(self) -> None:
        update_progress_artifact(self._artifact, self.percent)
        self._last = time.monotonic()
        get_run_logger().info("%s: %d/%d (%.0f%%)", self.description, self.done, self.total, self.percent)
