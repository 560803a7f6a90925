"""The command line's live progress: drawn on a terminal, silent elsewhere."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from reelflow.flows.terminal import live_progress, progress_table
from reelflow.tasks import progress as progress_module
from reelflow.tasks.progress import KEPT, Progress, running


@pytest.fixture(autouse=True)
def empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "_RUNNING", [])


def drawn(table) -> str:  # noqa: ANN001
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(table)
    return console.file.getvalue()


def test_a_stage_is_listed_while_it_computes_then_as_done_or_failed() -> None:
    with Progress(label=("intro-0a1b2c", "reconstruct", "encode_latents")) as progress:
        progress.start(8, unit="frames")
        progress.advance(2)
        assert running() == [progress] and progress.state == "running"
        text = drawn(progress_table())
        assert "intro-0a1b2c" in text and "encode_latents" in text and "2/8 frames (25%)" in text and "#####......" in text
    assert progress.state == "done" and "done" in drawn(progress_table())
    with pytest.raises(RuntimeError), Progress(label=("c", "p", "invert_latents")) as failed:
        raise RuntimeError("out of memory")
    assert failed.state == "failed"


def test_only_the_last_finished_stages_are_kept_and_shown() -> None:
    for index in range(KEPT + 5):
        with Progress(label=("clip", "p", f"stage-{index}")):
            pass
    with Progress(label=("clip", "p", "computing")):
        kept = running()
        assert len(kept) == KEPT + 1 and kept[0].stage == "stage-5"
        text = drawn(progress_table())
        assert "computing" in text and f"stage-{KEPT + 4}" in text and f"stage-{KEPT - 10} " not in text


def test_the_live_display_draws_on_a_terminal_and_nothing_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    quiet = io.StringIO()  # not a terminal: a log file, CI
    with live_progress(quiet), Progress(label=("clip", "p", "denoise_latents")) as progress:
        progress.start(4)
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    with Progress(label=("clip", "p", "denoise_latents")) as progress, live_progress(shown, enabled=True):
        progress.start(4)
        progress.advance(3)  # drawn at the latest when the display stops
    assert "denoise_latents" in shown.getvalue() and "3/4 steps" in shown.getvalue()


def test_log_lines_print_above_the_live_table_not_into_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    shown = io.StringIO()
    handler = logging.StreamHandler(shown)
    logger = logging.getLogger("reelflow.test-terminal")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with Progress(label=("clip", "p", "encode_latents")) as progress, live_progress(shown, enabled=True):
            progress.start(2)
            logger.info("a line the run logged")
            assert handler.stream is not shown, "routed through the display while it is drawn"
        assert handler.stream is shown, "given back after"
    finally:
        logger.removeHandler(handler)
    lines = shown.getvalue().splitlines()
    logged = [i for i, line in enumerate(lines) if "a line the run logged" in line]
    assert logged and lines[logged[0]].strip().endswith("a line the run logged"), "a whole line, not mixed into the table"
