"""Runs this process starts and supervises itself go without Prefect's flow-run heartbeat, whose
thread Prefect 3.9 joins at the end of every run (up to 1 s: most of a cached rerun). Runs that
Prefect's engine starts, as a worker does for a deployment, keep it."""

from __future__ import annotations

from pathlib import Path

import prefect.flow_engine
import pytest
from prefect import flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from reelflow.flows.cli import main
from reelflow.flows.edit import edit_video, edit_video_with_settings
from reelflow.schemas.settings import Settings

pytestmark = pytest.mark.flow


@pytest.fixture
def heartbeats(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | None]]:
    """(flow name, heartbeat interval or None) of every flow run, as Prefect's engine sees it when it starts
    the heartbeat thread; None starts no thread, so nothing is joined at the end."""
    seen: list[tuple[str, int | None]] = []
    original = prefect.flow_engine._send_heartbeats

    def spy(engine, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.append((engine.flow.name, engine.heartbeat_seconds))
        return original(engine, *args, **kwargs)

    monkeypatch.setattr(prefect.flow_engine, "_send_heartbeats", spy)
    return seen


def test_direct_calls_run_without_a_heartbeat_and_engine_runs_keep_it(make_spec, heartbeats) -> None:
    spec = make_spec()
    edit_video(spec)
    edit_video_with_settings(Settings())(spec)  # what `reelflow run` and `reelflow demo` call
    assert heartbeats == [("edit-video", None), ("edit-video", None)]

    heartbeats.clear()
    prefect.flow_engine.run_flow(flow=edit_video, parameters={"spec": spec})  # how a worker runs a deployment
    assert heartbeats == [("edit-video", 180)]

    heartbeats.clear()
    flow(name="parent")(lambda: edit_video(spec))()  # a subflow of a run that keeps its heartbeat keeps it too
    assert heartbeats == [("parent", 180), ("edit-video", 180)]

    heartbeats.clear()
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):  # asked for explicitly: kept
        edit_video(spec)
    assert heartbeats == [("edit-video", 60)]


def test_cli_bulk_runs_without_heartbeats(capsys, tiny_bundle: Path, clip: Path, tmp_path: Path, heartbeats) -> None:
    tiny = ["stages.decode_video.params.num_frames=2", "stages.decode_video.params.width=64",
            "stages.decode_video.params.height=64", "stages.encode_video.params.preset=ultrafast"]  # fmt: skip
    sets = [arg for value in (f"models.sd.id={tiny_bundle}", *tiny) for arg in ("--set", value)]
    library = tmp_path / "library"
    library.mkdir()
    (library / "clip.mp4").write_bytes(clip.read_bytes())
    argv = ["bulk", f"{library}/*.mp4", "reconstruct", "--store", f"{tmp_path}/store", "--output", f"{tmp_path}/out"]
    assert main([*argv, *sets]) == 0, capsys.readouterr().err
    assert sorted(heartbeats) == [("bulk-edit", None), ("edit-video", None)]
