"""The DAG engine: compute every stage key up front, then run the stages as Prefect tasks.

Planning is pure: each key follows from the stage's params, version, model fingerprint and its
inputs' keys, and decode_video's input key is the hash of the source file. Knowing every key
before running lets the engine tell Prefect which cache records to trust (see tasks.caching) and
lets a run manifest say what was cached.

Execution submits a stage as soon as all its inputs are done, so independent branches run at once
on the flow's bounded task runner. A failed stage fails its descendants (they are skipped) but
never its siblings.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prefect.filesystems import WritableFileSystem
from prefect.futures import PrefectFuture, as_completed

from reelflow.core.models import fingerprint_model
from reelflow.schemas.calls import InputRef, ResolvedModel, SourceRef, StageCall, StoreSpec
from reelflow.schemas.graph import Node
from reelflow.schemas.manifest import StageRecord
from reelflow.schemas.pipeline import ModelSpec, PipelineSpec
from reelflow.schemas.refs import ArtifactRef
from reelflow.storage.keys import stage_key
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import TASKS


@dataclass(frozen=True)
class PlannedStage:
    node: Node
    call: StageCall

    @property
    def id(self) -> str:
        return self.node.id

    @property
    def key(self) -> str:
        return self.call.key


def plan_run(
    spec: PipelineSpec, *, source: SourceRef, store: StoreSpec, run_id: str, default_dtype: str
) -> list[PlannedStage]:
    """Every stage with its key and call, in topological order. Loads no model."""
    models = {name: resolve_model(m, default_dtype) for name, m in spec.models.items() if _used(spec, name)}
    planned: dict[str, PlannedStage] = {}
    for node in spec.graph.order():
        inputs = {slot: InputRef(stage=planned[src].call.stage_type, key=planned[src].key) for slot, src in node.inputs.items()}
        model = models[node.model] if node.model else None
        key = stage_key(
            stage=node.spec.stage,
            version=node.spec.version,
            params=node.spec.params.model_dump(mode="json"),
            models={"model": f"{model.fingerprint}|{model.dtype}"} if model else {},
            inputs={slot: ref.key for slot, ref in inputs.items()} | ({"source": source.key} if node.spec.reads_source else {}),
            seed=spec.seed if node.spec.seeded() else None,
        )
        call = StageCall(
            pipeline=spec.name,
            stage=node.spec,
            key=key,
            inputs=inputs,
            model=model,
            source=source if node.spec.reads_source else None,
            seed=spec.seed,
            store=store,
            run_id=run_id,
        )
        planned[node.id] = PlannedStage(node, call)
    return list(planned.values())


def resolve_model(model: ModelSpec, default_dtype: str) -> ResolvedModel:
    return ResolvedModel(
        id=model.id,
        revision=model.revision,
        dtype=model.dtype or default_dtype,
        fingerprint=fingerprint_model(model.id, model.revision),
    )


def _used(spec: PipelineSpec, name: str) -> bool:
    return any(node.model == name for node in spec.graph.order())


@dataclass
class Outcome:
    record: StageRecord
    ref: ArtifactRef | None = None


def execute(
    planned: list[PlannedStage], store: ArtifactStore, *, result_storage: Path | WritableFileSystem | None
) -> dict[str, Outcome]:
    """Run the planned stages on the current flow's task runner; returns an outcome per stage id."""
    by_id = {p.id: p for p in planned}
    outcomes: dict[str, Outcome] = {}
    running: dict[PrefectFuture, tuple[str, float]] = {}
    futures: dict[str, PrefectFuture] = {}
    while len(outcomes) < len(planned):
        for stage in _ready(planned, outcomes, {stage_id for stage_id, _ in running.values()}):
            blocked = _failed_input(stage, outcomes)
            if blocked:
                outcomes[stage.id] = Outcome(_record(stage, "skipped", 0.0, error=f"input {blocked!r} did not complete"))
                continue
            future = _submit(stage, store, [futures[d] for d in stage.node.inputs.values()], result_storage)
            futures[stage.id] = future
            running[future] = (stage.id, time.perf_counter())
        if not running:
            continue
        future = next(iter(as_completed(list(running))))
        stage_id, started = running.pop(future)
        outcomes[stage_id] = _outcome(by_id[stage_id], future, store, time.perf_counter() - started)
    return {p.id: outcomes[p.id] for p in planned}


def _ready(planned: list[PlannedStage], outcomes: Mapping[str, Outcome], active: set[str]) -> list[PlannedStage]:
    return [
        p
        for p in planned
        if p.id not in outcomes and p.id not in active and all(d in outcomes for d in p.node.inputs.values())
    ]


def _failed_input(stage: PlannedStage, outcomes: Mapping[str, Outcome]) -> str | None:
    for dep in stage.node.inputs.values():
        if outcomes[dep].record.status in ("failed", "skipped"):
            return dep
    return None


def _submit(
    stage: PlannedStage, store: ArtifactStore, wait_for: list[PrefectFuture], result_storage: Path | WritableFileSystem | None
) -> PrefectFuture:
    complete = store.is_complete(stage.call.stage_type, stage.key)
    options: dict = {"refresh_cache": not complete}
    if result_storage is not None:
        options["result_storage"] = result_storage
    return TASKS[stage.call.stage_type].with_options(**options).submit(call=stage.call, wait_for=wait_for)


def _outcome(stage: PlannedStage, future: PrefectFuture, store: ArtifactStore, seconds: float) -> Outcome:
    future.wait()
    state = future.state
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        message = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(state.message)
        return Outcome(_record(stage, "failed", seconds, error=message))
    ref: ArtifactRef = future.result()
    # Computed here only if this very task run wrote it: a Prefect cache hit, another run's output
    # or a retried flow run's earlier attempt all count as cached.
    status = "computed" if ref.task_run_id == str(future.task_run_id) else "cached"
    return Outcome(_record(stage, status, seconds, artifact=store.url_of(ref.path)), ref)


def _record(stage: PlannedStage, status: str, seconds: float, **extra: str | None) -> StageRecord:
    return StageRecord(
        name=stage.id, stage=stage.call.stage_type, key=stage.key, status=status, seconds=round(seconds, 4), **extra
    )
