"""Real services for the operations tests, started on loopback and stopped at the end: a Prefect
server, process workers, a picture server, and the Prefect CLI run against them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Service:
    """A subprocess in its own process group, with its output in a log file."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._handle = open(log, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            list(args), env=env, cwd=REPO, stdout=self._handle, stderr=subprocess.STDOUT, start_new_session=True
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill()
        self._handle.close()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class PrefectServer:
    """``prefect server start`` on a free loopback port, with its own PREFECT_HOME."""

    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.ui = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api,
            "PREFECT_UI_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
            "PREFECT_LOGGING_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.services: list[Service] = []
        server_env = {k: v for k, v in self.env.items() if k != "PREFECT_API_URL"}
        self.server = self.start(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)], "server", env=server_env
        )
        wait_for(self._healthy, 120, "the Prefect server to answer /api/health")

    def _healthy(self) -> bool:
        if self.server.proc.poll() is not None:
            raise RuntimeError(f"prefect server exited:\n{self.server.tail()}")
        try:
            with urllib.request.urlopen(f"{self.api}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def start(self, args: Sequence[str], name: str, env: dict[str, str] | None = None, **extra_env: str) -> Service:
        args = [str(BIN / args[0]), *args[1:]] if (BIN / args[0]).exists() else list(args)
        service = Service(args, {**(env or self.env), **extra_env}, self.home / f"{name}-{len(self.services)}.log")
        self.services.append(service)
        return service

    def worker(self, pool: str, *, limit: int | None = None, **env: str) -> Service:
        args = ["prefect", "worker", "start", "--pool", pool, "--type", "process", "--prefetch-seconds", "5"]
        return self.start([*args, *(["--limit", str(limit)] if limit else [])], f"worker-{pool}", **env)

    def cli(self, *args: str, timeout: float = 300, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(BIN / "prefect"), *args], env={**self.env, **env}, cwd=REPO, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def api_post(self, path: str, body: dict) -> list | dict:
        request = urllib.request.Request(
            f"{self.api}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def api_get(self, path: str) -> list | dict:
        with urllib.request.urlopen(f"{self.api}{path}", timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.server.stop()
