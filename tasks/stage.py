"""The stage-task registry: one Prefect task per declared (stage, method), and the check that the two agree.

``@stage_task("invert_latents", "fatezero")`` registers a task body as the implementation of that
declaration, with caching, retries and naming declared once here. A body for a stage nobody declared
is refused when it is decorated; :func:`load_implementations`, run when the DAG engine is imported,
imports every method package's implementation modules and refuses a declaration that none of them
implements. Both happen at import, so a half-registered method never reaches a flow as a KeyError.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

from prefect import Task, task

from reelflow.schemas.calls import StageCall
from reelflow.schemas.errors import RegistryError
from reelflow.schemas.refs import ArtifactRef
from reelflow.schemas.registry import load_methods
from reelflow.schemas.stages import STAGE_TYPES, StageSpec, stage_tag
from reelflow.tasks.caching import StageKeyPolicy, retry_transient

RETRY_DELAY_SECONDS = 2
TASKS: dict[tuple[str, str | None], Task] = {}
_loaded: list[bool] = []

StageFn = Callable[[StageCall], ArtifactRef]


def stage_task(stage: str, method: str | None = None, *, retries: int = 2) -> Callable[[StageFn], Task]:
    """Register ``fn`` as the Prefect task of the declared ``(stage, method)`` (JSON result = the ref)."""

    def register(fn: StageFn) -> Task:
        key = (stage, method)
        if key not in STAGE_TYPES:
            raise RegistryError(
                f"{fn.__module__}.{fn.__qualname__} implements stage {stage_tag(*key)}, which no method declares; "
                "declare it (a StageSpec subclass with @register_stage) in the module its method's entry point loads"
            )
        runnable = task(
            fn,
            name=stage_tag(*key).replace("_", "-").replace(":", "-"),
            task_run_name="{call.stage.id}",
            cache_policy=StageKeyPolicy(),
            persist_result=True,
            result_serializer="json",
            retries=retries,
            # One number, not a backoff list: the UI shows a list's delay as "NaNs"; the jitter spreads retries.
            retry_delay_seconds=RETRY_DELAY_SECONDS,
            retry_jitter_factor=0.3,
            retry_condition_fn=retry_transient,
        )
        TASKS[key] = runnable
        return runnable

    return register


def task_for(spec: StageSpec) -> Task:
    load_implementations()
    return TASKS[(spec.stage, spec.method)]


def load_implementations() -> None:
    """Import every method's implementation modules (once), then check each declaration has its task.

    The DAG engine calls this when it is imported, so a method package that declares a stage it never
    implements stops ``reelflow`` at start-up, not inside a flow.
    """
    if _loaded:
        return
    for method in load_methods().values():
        for module in method.implementations:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise RegistryError(f"method {method.name!r} names the implementation module {module!r}, which cannot "
                                    f"be imported ({exc}); fix the method's `implementations`") from exc  # fmt: skip
    check_registries(STAGE_TYPES, TASKS)
    _loaded.append(True)


def check_registries(declared: Mapping[tuple[str, str | None], type], implemented: Mapping[tuple[str, str | None], object]) -> None:
    """Refuse a declaration without an implementation, naming it (the reverse is refused by ``stage_task``)."""
    missing = [key for key in declared if key not in implemented]
    if missing:
        named = ", ".join(f"{stage_tag(*key)} (declared in {declared[key].__module__})" for key in missing)
        raise RegistryError(
            f"no implementation for {named}: none of its method's `implementations` modules registers it; "
            "add a task body decorated with @stage_task(stage, method)"
        )
