"""The ``stage_task`` decorator: one place that declares caching, retries and naming for every stage."""

from __future__ import annotations

from collections.abc import Callable

from prefect import Task, task
from prefect.tasks import exponential_backoff

from reelflow.schemas.calls import StageCall
from reelflow.schemas.refs import ArtifactRef
from reelflow.tasks.caching import StageKeyPolicy, retry_transient

TASKS: dict[str, Task] = {}

StageFn = Callable[[StageCall], ArtifactRef]


def stage_task(stage: str, *, retries: int = 2) -> Callable[[StageFn], Task]:
    """Register ``fn`` as the Prefect task of ``stage`` (kebab-case display name, JSON result = the ref)."""

    def register(fn: StageFn) -> Task:
        runnable = task(
            fn,
            name=stage.replace("_", "-"),
            task_run_name="{call.stage.id}",
            cache_policy=StageKeyPolicy(),
            persist_result=True,
            result_serializer="json",
            retries=retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=1),
            retry_jitter_factor=0.3,
            retry_condition_fn=retry_transient,
        )
        TASKS[stage] = runnable
        return runnable

    return register
