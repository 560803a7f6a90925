"""How an edit's flow runs: its task runner, chosen by settings (``REELFLOW_TASK_RUNNER``), and no
flow-run heartbeat for runs the calling process supervises itself (:func:`supervised_here`).

``threads`` (the default) runs independent stages on a bounded thread pool in the flow-run
process: right for a GPU worker, where model stages share one CUDA context. ``dask`` hands the
stages to Dask (prefect-dask): a scheduler at ``REELFLOW_DASK_ADDRESS`` shared by many edits, or a
temporary local cluster of ``REELFLOW_MAX_CONCURRENCY`` single-threaded worker processes. Stage
tasks take and return small pydantic references and read everything else from the store, so they
run wherever the store is reachable.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Flow
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import ValidationError

from reelflow.schemas.errors import SpecError
from reelflow.schemas.settings import Settings


def task_runner(settings: Settings) -> TaskRunner:
    if settings.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=settings.max_concurrency)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise SpecError(
            "REELFLOW_TASK_RUNNER=dask needs prefect-dask; install it with pip install 'reelflow[dask]'"
        ) from None
    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": settings.max_concurrency, "threads_per_worker": 1, "dashboard_address": None}
    )


def default_task_runner() -> TaskRunner:
    """The runner a flow is defined with, so deployments follow the worker's settings too.

    Bad settings fall back to threads here; the flow's own checks then report them.
    """
    try:
        return task_runner(Settings())
    except (ValidationError, SpecError):
        return ThreadPoolTaskRunner(max_workers=2)


@contextmanager
def supervised_here() -> Iterator[None]:
    """Flow runs this block starts outside any other run go without Prefect's flow-run heartbeat.

    Prefect 3.9 joins its heartbeat thread when a run ends, and the thread sleeps in 1 s slices: every
    run paid up to 1 s at its end (0.98 s of a 1.09 s one-task flow). The heartbeat lets the server
    tell that a run's process died; here the process that runs the flow is the one that asked for it
    (``reelflow run``, a script), so whoever started it sees it die. The cost: such a run killed
    mid-way stays ``Running`` in the UI. Kept: runs inside another run (a worker's run keeps heartbeats
    for its subflows too) and every run of a process that sets ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``.
    """
    if FlowRunContext.get() is not None or "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


class SupervisedFlow(Flow):
    """A flow whose direct calls run under ``supervised_here``. Deployments run it through Prefect's
    engine (``run_flow``), not through a call, so their runs keep the heartbeat."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with supervised_here():
            return super().__call__(*args, **kwargs)

    def with_options(self, **options: Any) -> SupervisedFlow:
        return supervised(super().with_options(**options))  # Prefect's with_options builds a plain Flow


def supervised(wrapped: Flow) -> SupervisedFlow:
    """Decorator, above ``@flow``: the flow's direct calls run under ``supervised_here``."""
    wrapped.__class__ = SupervisedFlow
    return wrapped
