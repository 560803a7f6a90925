"""The command line's live progress: while ``reelflow run``, ``demo``, ``bulk`` or ``compare`` runs on a terminal, a
table of the stages computing in this process (clip, pipeline, stage, a bar, done of total in the stage's unit,
the rate, the time left), redrawn twice a second, with the run's log lines (a stage logs one at every tenth of its
work) printed above it; a bulk edit's clips each have their rows. Not on a terminal (a log file, CI) nothing is
drawn, and the log lines alone say how the stages progress.

Stages sent to Dask workers compute in other processes; their progress is in their cards in the Prefect UI.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from reelflow.tasks.progress import Progress, running

SHOWN_FINISHED = 8  # finished stages kept on screen under the running ones
BAR = 20  # characters of a bar


@contextmanager
def live_progress(stream: IO[str] | None = None, *, enabled: bool | None = None) -> Iterator[None]:
    """Draw :func:`progress_table` on ``stream`` (stderr) until the block ends, if it is a terminal (or ``enabled``)."""
    stream = sys.stderr if stream is None else stream
    if not (stream.isatty() if enabled is None else enabled):
        yield
        return
    console = Console(file=stream, force_terminal=enabled or None)
    with Live(console=console, refresh_per_second=2, get_renderable=progress_table, transient=False) as live:
        with _logs_above(live, stream):
            yield


@contextmanager
def _logs_above(live: Live, stream: IO[str]) -> Iterator[None]:
    """Log handlers writing to ``stream`` (Prefect's console handler among them) print above the live table while it
    is drawn, instead of between its redraws (which would garble both)."""
    above = _Above(live)
    swapped = []
    loggers = [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for handler in {h for logger in loggers for h in logger.handlers}:
        console = getattr(handler, "console", None)
        if isinstance(handler, logging.StreamHandler) and handler.stream in (stream, sys.__stderr__, sys.stderr):
            swapped.append((handler, handler.stream, console.file if isinstance(console, Console) else None))
            handler.setStream(above)
            if isinstance(console, Console):
                console.file = above
    try:
        yield
    finally:
        for handler, old, old_file in swapped:
            handler.setStream(old)
            if old_file is not None:
                handler.console.file = old_file


class _Above:
    """A text stream whose whole lines the live display prints above its table."""

    def __init__(self, live: Live) -> None:
        self.live, self.buffer = live, ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self.live.console.print(Text.from_ansi(line), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self.live.console.is_terminal


def progress_table(shown: list[Progress] | None = None) -> Table:
    """The stages computing (all of them) and the last few finished, oldest first."""
    shown = running() if shown is None else shown
    finished = [p for p in shown if p.state != "running"][-SHOWN_FINISHED:]
    rows = [p for p in shown if p.state == "running" or p in finished]
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in ("clip", "pipeline", "stage", "", "progress", "time"):
        table.add_column(column, no_wrap=True)
    for p in rows:
        table.add_row(p.clip, p.pipeline, p.stage, _bar(p), _status(p), f"{p.seconds:.0f} s",
                      style="dim" if p.state == "done" else "red" if p.state == "failed" else None)  # fmt: skip
    return table


def _bar(p: Progress) -> str:
    if p.state == "done":
        return "#" * BAR
    if not p.total:
        return "." * BAR
    filled = round(BAR * p.done / p.total)
    return "#" * filled + "." * (BAR - filled)


def _status(p: Progress) -> str:
    if p.state != "running":
        return p.state
    return p.status() if p.total else "running"
