"""Task runners for an edit's stages, chosen by settings (``REELFLOW_TASK_RUNNER``).

``threads`` (the default) runs independent stages on a bounded thread pool in the flow-run
process: right for a GPU worker, where model stages share one CUDA context. ``dask`` hands the
stages to Dask (prefect-dask): a scheduler at ``REELFLOW_DASK_ADDRESS`` shared by many edits, or a
temporary local cluster of ``REELFLOW_MAX_CONCURRENCY`` single-threaded worker processes. Stage
tasks take and return small pydantic references and read everything else from the store, so they
run wherever the store is reachable.
"""

from __future__ import annotations

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
