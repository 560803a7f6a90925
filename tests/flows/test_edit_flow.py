"""The edit-video flow on tiny models: cold run, cached rerun, partial recompute, failure isolation."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from reelflow.core.video import probe_video
from reelflow.flows.edit import edit_video
from reelflow.schemas.errors import StageFailed
from reelflow.storage.store import ArtifactStore

pytestmark = pytest.mark.flow
ALL = ("decode_video", "encode_latents", "decode_latents", "encode_video", "compute_metrics")


def statuses(manifest) -> dict[str, str]:
    return {r.name: r.status for r in manifest.stages}


def prefect_task_states(flow_run_id: str, count: int) -> dict[str, str]:
    """Task-run states as the API has them; they arrive asynchronously, so wait until all are final."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            final = len(runs) == count and all(run.state and run.state.is_final() for run in runs)
            if final or time.monotonic() > deadline:
                return {run.name: run.state.name for run in runs}
            time.sleep(0.2)


def test_cold_run_computes_every_stage_and_writes_outputs(make_spec, clip: Path) -> None:
    manifest = edit_video(make_spec())
    assert statuses(manifest) == {name: "computed" for name in ALL}
    assert manifest.status == "completed"

    video = Path(manifest.outputs["encode_video"])
    assert video.name == "clip.reconstruct.mp4"
    info, source = probe_video(video), probe_video(clip)
    assert (info.width, info.height, info.num_frames) == (64, 64, 6)
    assert info.fps == source.fps and info.has_audio
    assert abs(info.duration - 6 / 24) < 1 / 24

    written = json.loads(Path(manifest.outputs["manifest"]).read_text())
    assert written["status"] == "completed" and [s["name"] for s in written["stages"]] == list(ALL)
    assert written["input"]["key"] == manifest.input.key and written["spec"]["name"] == "reconstruct"
    assert set(written["metrics"]["compute_metrics"]) == {"psnr", "ssim"}
    for record in written["stages"]:
        assert ArtifactStore(manifest.store).find(record["key"]).complete


def test_rerun_is_served_from_cache_without_running_any_stage(make_spec, monkeypatch) -> None:
    spec = make_spec()
    edit_video(spec)

    def refuse(*args, **kwargs):
        raise AssertionError("a cached stage was computed again")

    monkeypatch.setattr("reelflow.tasks.runtime._compute", refuse)
    again = edit_video(spec)
    assert statuses(again) == {name: "cached" for name in ALL}
    assert prefect_task_states(again.run_id, len(ALL)) == {name: "Cached" for name in ALL}
    Path(again.outputs["encode_video"]).unlink()
    third = edit_video(spec)
    assert Path(third.outputs["encode_video"]).is_file(), "outputs are re-exported from the store"


def test_the_manifest_says_what_each_stage_cost_and_what_reuse_saved(make_spec) -> None:
    spec = make_spec()
    first = edit_video(spec)
    store = ArtifactStore(first.store)
    for record in first.stages:
        stored = store.find(record.key)
        assert record.bytes == store.size(stored.path) > 0
        assert record.compute_seconds is not None and 0 < record.compute_seconds <= record.seconds
        assert record.peak_memory > 50 << 20  # a Python process with torch loaded
    assert first.cost.stored_bytes == sum(r.bytes for r in first.stages) and first.cost.reused_bytes == 0
    assert first.cost.peak_memory == max(r.peak_memory for r in first.stages)
    again = edit_video(spec)
    assert again.cost.computed_seconds == 0 and again.cost.stored_bytes == 0
    assert again.cost.reused_bytes == first.cost.stored_bytes
    assert again.cost.reused_seconds == pytest.approx(first.cost.computed_seconds, abs=1e-3)
    written = json.loads(Path(again.outputs["manifest"]).read_text())
    assert written["cost"]["reused_bytes"] == first.cost.stored_bytes


def test_changing_one_stage_recomputes_it_and_its_descendants_only(make_spec) -> None:
    edit_video(make_spec())
    crf = edit_video(make_spec("stages.encode_video.params.crf=30"))
    assert statuses(crf) == {
        "decode_video": "cached",
        "encode_latents": "cached",
        "decode_latents": "cached",
        "encode_video": "computed",
        "compute_metrics": "cached",
    }
    chunk = edit_video(make_spec("stages.encode_latents.params.chunk_size=3"))
    assert statuses(chunk) == {"decode_video": "cached"} | {name: "computed" for name in ALL[1:]}


def test_a_deleted_artifact_is_recomputed_even_with_a_prefect_record(make_spec) -> None:
    spec = make_spec()
    first = edit_video(spec)
    store = ArtifactStore(first.store)
    store.remove(store.find(first.stages[2].key).path)
    again = edit_video(spec)
    assert statuses(again) == {name: "computed" if name == "decode_latents" else "cached" for name in ALL}
    assert store.is_complete("decode_latents", first.stages[2].key)


def test_a_failed_stage_skips_its_descendants_but_not_its_siblings(make_spec, monkeypatch) -> None:
    def broken(inputs):  # noqa: ANN001, ANN202
        raise ValueError("metric exploded")

    monkeypatch.setitem(__import__("reelflow.tasks.metrics", fromlist=["IMPLEMENTATIONS"]).IMPLEMENTATIONS, "psnr", broken)
    spec = make_spec()
    with pytest.raises(StageFailed, match="stage 'compute_metrics' failed: ValueError: metric exploded"):
        edit_video(spec)
    manifest = json.loads(Path(spec.output, "clip.reconstruct.manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert {s["name"]: s["status"] for s in manifest["stages"]}["encode_video"] == "computed"
    failed = [s for s in manifest["stages"] if s["status"] == "failed"]
    assert [s["name"] for s in failed] == ["compute_metrics"] and "metric exploded" in failed[0]["error"]
    assert not ArtifactStore(spec.store).is_complete("compute_metrics", failed[0]["key"])


def test_deterministic_failures_are_not_retried(make_spec, monkeypatch) -> None:
    calls = []

    def broken(inputs):  # noqa: ANN001, ANN202
        calls.append(1)
        raise ValueError("deterministic")

    monkeypatch.setitem(__import__("reelflow.tasks.metrics", fromlist=["IMPLEMENTATIONS"]).IMPLEMENTATIONS, "psnr", broken)
    with pytest.raises(StageFailed):
        edit_video(make_spec())
    assert len(calls) == 1


def test_transient_io_errors_are_retried(make_spec, monkeypatch) -> None:
    import reelflow.tasks.metrics

    calls = []
    real = reelflow.tasks.metrics.IMPLEMENTATIONS["psnr"]

    def flaky(inputs):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError("store connection dropped")
        return real(inputs)

    monkeypatch.setitem(reelflow.tasks.metrics.IMPLEMENTATIONS, "psnr", flaky)
    manifest = edit_video(make_spec("stages.compute_metrics.params.metrics=[psnr]"))
    assert len(calls) == 2 and manifest.status == "completed"


def test_independent_branches_run_concurrently(make_spec, monkeypatch) -> None:
    """encode_video and compute_metrics both wait on one barrier: run one after the other, they would time out."""
    import reelflow.tasks.metrics
    import reelflow.tasks.video

    barrier = threading.Barrier(2, timeout=30)
    real_encode, real_metrics = reelflow.tasks.video._encode, reelflow.tasks.metrics._compute

    def encode(ctx):
        barrier.wait()
        return real_encode(ctx)

    def metrics(ctx):
        barrier.wait()
        return real_metrics(ctx)

    monkeypatch.setattr(reelflow.tasks.video, "_encode", encode)
    monkeypatch.setattr(reelflow.tasks.metrics, "_compute", metrics)
    manifest = edit_video(make_spec())
    assert manifest.status == "completed"
