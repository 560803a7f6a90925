"""Operations end to end: the project's prefect.yaml deployed to a real Prefect server, process
workers running the flows, bulk edits over a library, crashes, concurrency, and the UI.

All of it on loopback with tiny models; the services are started by tests/ops/conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from reelflow.core.synthetic import write_synthetic_clip
from reelflow.flows.edit import prepare_run, resolve_spec
from reelflow.schemas.manifest import RunManifest
from reelflow.schemas.settings import Settings
from reelflow.storage.leases import Leases
from reelflow.storage.store import ArtifactStore
from tests.ops.services import wait_for

pytestmark = pytest.mark.flow
ALL = ["decode_video", "encode_latents", "decode_latents", "encode_video", "compute_metrics"]


def clip(path: Path, seed: int, seconds: float = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_synthetic_clip(path, width=96, height=64, fps=24, seconds=seconds, seed=seed)
    return path


def table(ops, run_id: str, key: str) -> list[dict]:
    (artifact,) = ops.artifacts(run_id, key)
    return json.loads(artifact["data"]) if isinstance(artifact["data"], str) else artifact["data"]


def test_bulk_edit_deployment_isolates_a_corrupt_clip_and_a_rerun_computes_only_it(ops, tiny_bundle, tmp_path) -> None:
    library = tmp_path / "library"
    for i in range(5):
        clip(library / f"clip{i}.mp4", seed=i)
    (library / "clip2.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4096))
    out = tmp_path / "edited"
    params = ops.edit_params(tiny_bundle, library=f"{library}/*.mp4", output=str(out), concurrency=2)

    first = ops.wait(ops.deployment_run("bulk-edit/nightly", params))
    assert first["state_type"] == "FAILED" and "1 of 5 clips failed: clip2.mp4" in first["state"]["message"]
    rows = table(ops, first["id"], "bulk-reconstruct")
    assert [Path(r["clip"]).name for r in rows] == [f"clip{i}.mp4" for i in range(5)]
    assert [r["status"] for r in rows] == ["completed", "completed", "failed", "completed", "completed"]
    assert rows[2]["error"].startswith("InputVideoError") and "clip2.mp4" in rows[2]["error"]
    assert all(Path(r["output"]).is_file() for r in rows if r["status"] == "completed")
    assert all(r["computed"] == ", ".join(ALL) for r in rows if r["status"] == "completed")
    # Each clip ran as its own edit-video/default run on the GPU pool.
    children = ops.child_runs(first["id"])
    assert len(children) == 5 and {c["work_pool_name"] for c in children} == {"reelflow-gpu"}

    clip(library / "clip2.mp4", seed=2)
    second = ops.wait(ops.deployment_run("bulk-edit/nightly", params))
    assert second["state_type"] == "COMPLETED"
    rows = table(ops, second["id"], "bulk-reconstruct")
    assert [r["status"] for r in rows] == ["exists", "exists", "completed", "exists", "exists"]
    assert rows[2]["computed"] == ", ".join(ALL) and [r["computed"] for r in rows if r["status"] == "exists"] == ["-"] * 4
    assert len(ops.child_runs(second["id"])) == 1


def test_two_concurrent_runs_of_one_edit_compute_each_stage_once(ops, tiny_bundle, tmp_path) -> None:
    source = clip(tmp_path / "shared.mp4", seed=11, seconds=1.0)
    runs = [
        ops.deployment_run("edit-video/default", ops.edit_params(tiny_bundle, input=str(source), output=str(tmp_path / n)))
        for n in ("a", "b")
    ]
    assert [ops.wait(r)["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    manifests = [RunManifest.model_validate_json((tmp_path / n / "shared.reconstruct.manifest.json").read_text()) for n in "ab"]
    computed = [{r.name for r in m.stages if r.status == "computed"} for m in manifests]
    assert computed[0] | computed[1] == set(ALL) and not computed[0] & computed[1]


def _plan(ops, tiny_bundle, source: Path, *overrides: str):
    spec = resolve_spec(None, "fatezero-lowcost", [*_fatezero(tiny_bundle), *overrides])
    spec = spec.model_copy(update={"input": str(source), "store": str(ops.store)})
    return {p.id: p.key for p in prepare_run(spec, Settings()).planned}


def _fatezero(bundle: Path) -> list[str]:
    return [
        f"models.sd.id={bundle}",
        "stages.decode_video.params.num_frames=8",
        "stages.decode_video.params.width=64",
        "stages.decode_video.params.height=64",
        "stages.decode_video.params.multiple=8",
        "stages.invert_latents.params.num_steps=10",
        "stages.invert_latents.params.min_channels=0",
    ]


def _kill_when_leased(ops, key: str, *, whole_worker: bool) -> int:
    """Wait until a process holds the compute lease on ``key``; SIGKILL it (or its whole worker)."""
    leases = Leases(ArtifactStore(str(ops.store)))
    lease = wait_for(lambda: leases.read(key), 300, f"a lease on {key[:12]}", interval=0.05)
    if whole_worker:
        ops.workers["reelflow-gpu"].kill()
    else:
        os.kill(lease.pid, signal.SIGKILL)
    return lease.pid


def test_killed_runs_leave_nothing_complete_and_resume_from_cached_stages(ops, tiny_bundle, tmp_path) -> None:
    source = clip(tmp_path / "long.mp4", seed=21, seconds=1.0)
    store = ArtifactStore(str(ops.store))
    keys = _plan(ops, tiny_bundle, source)
    params = {"preset": "fatezero-lowcost", "overrides": _fatezero(tiny_bundle), "input": str(source),
              "store": str(ops.store), "output": str(tmp_path / "out")}  # fmt: skip

    # 1. The flow-run process dies mid-inversion (the OOM killer): the worker reports it crashed.
    run_id = ops.deployment_run("edit-video/default", params)
    pid = _kill_when_leased(ops, keys["invert_latents"], whole_worker=False)
    assert ops.wait(run_id)["state_type"] == "CRASHED"
    assert not store.is_complete("invert_latents", keys["invert_latents"])
    assert store.is_complete("decode_video", keys["decode_video"])
    lease = Leases(store).read(keys["invert_latents"])
    assert lease is None or (lease.pid == pid and not lease.live())  # a dead holder never blocks

    # `prefect flow-run retry` reschedules the same run; cached stages are not recomputed. A worker
    # started with --limit that saw the run crash dies when it picks up the retry: Prefect 3.8.8 keeps
    # the crashed run's limiter token (the error of PrefectHQ/prefect#10632, reported again as #16806).
    # So the retry goes to a fresh worker, as it would after a supervisor restarts the worker.
    ops.workers["reelflow-gpu"].stop()
    ops.worker("reelflow-gpu", limit=2)
    ops.server.cli("flow-run", "retry", run_id)
    assert ops.wait(run_id)["state_type"] == "COMPLETED"
    manifest = RunManifest.model_validate_json((tmp_path / "out" / "long.fatezero-lowcost.manifest.json").read_text())
    status = {r.name: r.status for r in manifest.stages}
    assert status["decode_video"] == status["encode_latents"] == "cached"
    assert status["invert_latents"] == "computed"

    # 2. The whole worker dies mid-denoise of a new edit; a new worker and a new run resume it.
    edit = "stages.denoise_latents.params.guidance_scale=5.0"
    keys = _plan(ops, tiny_bundle, source, edit)
    params["overrides"] = [*params["overrides"], edit]
    run_id = ops.deployment_run("edit-video/default", params)
    _kill_when_leased(ops, keys["denoise_latents"], whole_worker=True)
    assert not store.is_complete("denoise_latents", keys["denoise_latents"])
    ops.worker("reelflow-gpu", limit=2)
    rerun = ops.wait(ops.deployment_run("edit-video/default", params))
    assert rerun["state_type"] == "COMPLETED"
    manifest = RunManifest.model_validate_json((tmp_path / "out" / "long.fatezero-lowcost.manifest.json").read_text())
    status = {r.name: r.status for r in manifest.stages}
    assert status["invert_latents"] == "cached" and status["denoise_latents"] == "computed"
    assert store.is_complete("denoise_latents", keys["denoise_latents"])


def test_the_deployments_validate_parameters_and_the_schedule_starts_inactive(ops) -> None:
    (nightly,) = ops.server.api_post("/deployments/filter", {"deployments": {"name": {"any_": ["nightly"]}}})
    assert nightly["enforce_parameter_schema"] and "spec" in nightly["parameter_openapi_schema"]["properties"]
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["active"] is False
    bad = ops.server.cli("deployment", "run", "bulk-edit/nightly", "--params", '{"concurrency": 0}', check=False)
    assert bad.returncode != 0 and "concurrency" in bad.stdout + bad.stderr

    assert schedule["id"] in ops.server.cli("deployment", "schedule", "ls", "bulk-edit/nightly").stdout
    ops.server.cli("deployment", "schedule", "resume", "bulk-edit/nightly", schedule["id"])
    (nightly,) = ops.server.api_post("/deployments/filter", {"deployments": {"name": {"any_": ["nightly"]}}})
    assert nightly["schedules"][0]["active"] is True
    ops.server.cli("deployment", "schedule", "pause", "bulk-edit/nightly", schedule["id"])
