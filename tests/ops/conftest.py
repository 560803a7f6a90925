"""The operations tests share one real deployment: a Prefect server, the work pools and the global
concurrency limit of the README, the project's prefect.yaml deployed, a picture server over the
store, and a process worker per pool. Everything listens on loopback and stops at the end."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ops.services import PrefectServer, Service, free_port, wait_for

TINY = [
    "stages.decode_video.params.num_frames=6",
    "stages.decode_video.params.width=64",
    "stages.decode_video.params.height=64",
    "stages.decode_video.params.multiple=8",
    "stages.encode_video.params.preset=ultrafast",
]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Ops:
    server: PrefectServer
    root: Path
    store: Path
    pictures_url: str
    workers: dict[str, Service]

    def worker(self, pool: str, limit: int | None = None) -> Service:
        """A process worker on ``pool`` polling every 2 s, linking pictures to the picture server."""
        service = self.server.worker(
            pool, limit=limit, PREFECT_WORKER_QUERY_SECONDS="2", REELFLOW_PICTURES_URL=self.pictures_url
        )
        self.workers[pool] = service
        return service

    def deployment_run(self, name: str, params: dict) -> str:
        result = self.server.cli("deployment", "run", name, "--params", json.dumps(params))
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout)
        assert match, result.stdout
        return match[1]

    def flow_run(self, run_id: str) -> dict:
        return self.server.api_get(f"/flow_runs/{run_id}")

    def wait(self, run_id: str, timeout: float = 400) -> dict:
        def final() -> dict | None:
            run = self.flow_run(run_id)
            return run if run["state_type"] in FINAL else None

        try:
            return wait_for(final, timeout, f"flow run {run_id} to finish", interval=1.0)
        except TimeoutError:
            logs = "\n---\n".join(s.tail(60) for s in self.workers.values())
            raise TimeoutError(f"flow run {run_id} did not finish; worker logs:\n{logs}") from None

    def artifacts(self, run_id: str, key_prefix: str = "") -> list[dict]:
        found = self.server.api_post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        return [a for a in found if (a.get("key") or "").startswith(key_prefix)]

    def child_runs(self, parent_run_id: str) -> list[dict]:
        tasks = self.server.api_post("/task_runs/filter", {"flow_runs": {"id": {"any_": [parent_run_id]}}})
        ids = [t["id"] for t in tasks]
        return self.server.api_post("/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"any_": ids}}})

    def edit_params(self, bundle: Path, **extra: object) -> dict:
        return {"preset": "reconstruct", "overrides": [*TINY, f"models.sd.id={bundle}"], "store": str(self.store), **extra}


@pytest.fixture(scope="session")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    root = tmp_path_factory.mktemp("ops")
    server = PrefectServer(root / "prefect-home")
    try:
        for pool in ("reelflow-gpu", "reelflow-cpu"):
            server.cli("work-pool", "create", pool, "--type", "process")
        server.cli("gcl", "create", "gpu", "--limit", "1")
        server.cli("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        store = root / "store"
        port = free_port()
        server.start(["reelflow", "serve-pictures", "--store", str(store), "--port", str(port)], "pictures")
        ops = Ops(server, root, store, f"http://127.0.0.1:{port}", {})
        ops.worker("reelflow-cpu", limit=4)
        ops.worker("reelflow-gpu", limit=2)
        time.sleep(1)
        yield ops
    finally:
        server.stop()
