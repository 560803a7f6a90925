"""The DAG engine: compute every stage key up front, then run the stages as Prefect tasks.

Planning is pure: each key follows from the stage's params, version, model fingerprint and its
inputs' keys, and decode_video's input key is the hash of the source file. Knowing every key
before running lets the engine tell Prefect which cache records to trust (see tasks.caching) and
lets a run manifest say what was cached.

Execution submits a stage as soon as all its inputs are done, so independent branches run at once
on the flow's bounded task runner. A key planned twice (by two stages, or by two runs executed together,
as a comparison of methods on one clip does) runs once. A failed stage fails its descendants (they are skipped) but
never its siblings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.filesystems import WritableFileSystem
from prefect.futures import PrefectFuture, as_completed

from reelflow.core.models import check_weight_name, fingerprint_model, get_family, infer_family, is_bundle
from reelflow.schemas.calls import InputRef, ResolvedModel, SourceRef, StageCall, StoreSpec
from reelflow.schemas.errors import ModelError, SpecError
from reelflow.schemas.graph import Node
from reelflow.schemas.manifest import StageRecord
from reelflow.schemas.pipeline import VIDEO, ModelSpec, PipelineSpec
from reelflow.schemas.refs import ArtifactRef
from reelflow.storage.keys import stage_key
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import load_implementations, task_for
from reelflow.tasks.artifacts import clip_label


load_implementations()  # every method's tasks, checked against the declarations: a mismatch stops here


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
    spec: PipelineSpec,
    *,
    sources: Mapping[str, SourceRef],
    store: StoreSpec,
    run_id: str,
    default_dtype: str,
    cache_dir: str | None = None,
) -> list[PlannedStage]:
    """Every stage with its key and call, in topological order. Loads no model.

    ``sources`` maps each source the stages read (see :meth:`PipelineSpec.used_sources`) to its file;
    each model is fingerprinted once here (a hub id by the commit its revision resolves to), and the
    stages load exactly that.
    """
    models = resolve_models(spec, default_dtype, cache_dir)
    clip = clip_label(sources[VIDEO].url) if VIDEO in sources else ""
    planned: dict[str, PlannedStage] = {}
    for position, node in enumerate(spec.graph.order()):
        producers = {slot: planned[src] for slot, src in node.inputs.items()}
        inputs = {slot: InputRef(stage=p.call.stage_type, key=p.key, kind=p.node.spec.produces) for slot, p in producers.items()}
        roles = {role: _fitting(node, role, name, models[name]) for role, name in node.models.items()}
        files = {slot: sources[name] for slot, name in node.sources.items()}
        key = stage_key(
            stage=node.spec.stage,
            method=node.spec.method,
            version=node.spec.version,
            params=node.spec.key_params(),
            models={role: "|".join(filter(None, (m.fingerprint, m.dtype, m.weight_name))) for role, m in roles.items()},
            inputs={slot: ref.key for slot, ref in inputs.items()} | {f"source:{s}": f.key for s, f in files.items()},
            seed=spec.seed if node.spec.seeded() else None,
        )
        call = StageCall(pipeline=spec.name, stage=node.spec, key=key, inputs=inputs, models=roles, sources=files,
                         seed=spec.seed, store=store, run_id=run_id, clip=clip, position=position)  # fmt: skip
        planned[node.id] = PlannedStage(node, call)
    return list(planned.values())


def resolve_models(spec: PipelineSpec, default_dtype: str, cache_dir: str | None = None) -> dict[str, ResolvedModel]:
    """Every model some stage uses, with its family, dtype and fingerprint settled (see :func:`resolve_model`)."""
    families: dict[str, set[str]] = {}
    for node in spec.graph.order():
        for role, name in node.models.items():
            families.setdefault(name, set(node.spec.roles[role].families))
            families[name] &= set(node.spec.roles[role].families)
    return {name: resolve_model(name, spec.models[name], families[name], default_dtype, cache_dir) for name in families}


def resolve_model(
    name: str, model: ModelSpec, families: set[str], default_dtype: str, cache_dir: str | None = None
) -> ResolvedModel:
    """A model's family (stated, told from its files, or the only one its roles accept), dtype and
    fingerprint; a hub revision becomes the commit it points at now, so a moved branch changes the
    keys and the stages load what was planned."""
    family = model.family or infer_family(model.id, model.revision, cache_dir)
    if family is None:
        if len(families) != 1:
            raise SpecError(
                f"cannot tell the family of model {name!r} ({model.id}) from its files; set `models.{name}.family` "
                f"({', '.join(sorted(families)) or 'no role accepts one family'})"
            )
        family = next(iter(families))
    family = get_family(family).name
    try:
        check_weight_name(family, model.weight_name)
    except ModelError as exc:
        raise SpecError(f"model {name!r} ({model.id}): {exc}") from None
    fingerprint = fingerprint_model(model.id, model.revision, family=family, cache_dir=cache_dir)
    commit = fingerprint.rpartition("@")[2] if fingerprint.startswith("hub:") else None
    bundle = family == "diffusers" and is_bundle(model.id, model.revision, cache_dir)
    return ResolvedModel(id=model.id, revision=commit, family=family, bundle=bundle, dtype=model.dtype or default_dtype,
                         fingerprint=fingerprint, weight_name=model.weight_name, offload=model.offload)  # fmt: skip


def _fitting(node: Node, role: str, name: str, model: ResolvedModel) -> ResolvedModel:
    families = node.spec.roles[role].families
    if model.family not in families:
        raise SpecError(
            f"stage {node.id!r} needs a {' or '.join(families)} model as its {role}, but {name!r} ({model.id}) is a "
            f"{model.family} model; map the role to another model with `models: {{{role}: ...}}`"
        )
    return model


@dataclass
class Outcome:
    record: StageRecord
    ref: ArtifactRef | None = None


def execute(
    planned: list[PlannedStage], store: ArtifactStore, *, result_storage: Path | WritableFileSystem | None
) -> dict[str, Outcome]:
    """Run the planned stages on the current flow's task runner; returns an outcome per stage id."""
    return execute_runs([planned], store, result_storage=result_storage)[0]


def execute_runs(
    runs: Sequence[Sequence[PlannedStage]], store: ArtifactStore, *, result_storage: Path | WritableFileSystem | None
) -> list[dict[str, Outcome]]:
    """Run the stages of several planned runs as one DAG; returns each run's outcomes by stage id.

    A key planned more than once (the decode and VAE stages two methods share on one clip) runs once: the
    first stage to plan it computes it, and every other stage with that key reports it ``cached`` with no
    seconds of its own (its ``compute_seconds`` still say what it cost).
    """
    unique: dict[str, PlannedStage] = {}
    for planned in runs:
        for stage in planned:
            unique.setdefault(stage.key, stage)
    by_key = _execute_unique(list(unique.values()), store, result_storage)
    return [{s.id: by_key[s.key] if unique[s.key] is s else _shared(by_key[s.key], s) for s in planned} for planned in runs]


def _shared(outcome: Outcome, stage: PlannedStage) -> Outcome:
    status = "cached" if outcome.record.status == "computed" else outcome.record.status
    return Outcome(outcome.record.model_copy(update={"name": stage.id, "status": status, "seconds": 0.0}), outcome.ref)


def _execute_unique(
    planned: list[PlannedStage], store: ArtifactStore, result_storage: Path | WritableFileSystem | None
) -> dict[str, Outcome]:
    """Submit each stage as soon as its inputs are done; outcomes by stage key (one stage per key)."""
    by_key = {p.key: p for p in planned}
    outcomes: dict[str, Outcome] = {}
    running: dict[PrefectFuture, tuple[str, float]] = {}
    futures: dict[str, PrefectFuture] = {}
    while len(outcomes) < len(planned):
        for stage in _ready(planned, outcomes, {key for key, _ in running.values()}):
            blocked = _failed_input(stage, outcomes)
            if blocked:
                error = f"input {by_key[blocked].id!r} did not complete"
                outcomes[stage.key] = Outcome(_record(stage, "skipped", 0.0, error=error))
                continue
            future = _submit(stage, store, [futures[d] for d in _inputs(stage)], result_storage)
            futures[stage.key] = future
            running[future] = (stage.key, time.perf_counter())
        if not running:
            continue
        future = next(iter(as_completed(list(running))))
        key, started = running.pop(future)
        outcomes[key] = _outcome(by_key[key], future, store, time.perf_counter() - started)
    return outcomes


def _inputs(stage: PlannedStage) -> list[str]:
    """The keys of the stages ``stage`` reads."""
    return [ref.key for ref in stage.call.inputs.values()]


def _ready(planned: list[PlannedStage], outcomes: Mapping[str, Outcome], active: set[str]) -> list[PlannedStage]:
    return [p for p in planned if p.key not in outcomes and p.key not in active and all(d in outcomes for d in _inputs(p))]


def _failed_input(stage: PlannedStage, outcomes: Mapping[str, Outcome]) -> str | None:
    for dep in _inputs(stage):
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
    return task_for(stage.call.stage).with_options(**options).submit(call=stage.call, wait_for=wait_for)


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
    return Outcome(_record(stage, status, seconds, artifact=store.url_of(ref.path), **_cost(store, ref.path)), ref)


def _cost(store: ArtifactStore, rel: str) -> dict[str, Any]:
    """What the artifact cost when it was computed (from its attrs) and its bytes in the store; nothing the store
    cannot tell (an artifact from before costs were recorded), and never a failure of the run."""
    try:
        attrs = store.read_attrs(rel)
        return {"compute_seconds": attrs.get("seconds"), "peak_memory": attrs.get("peak_memory"),
                "peak_gpu_memory": attrs.get("peak_gpu_memory"), "bytes": store.size(rel)}  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        logging.getLogger(__name__).warning("no cost for %s: %s", rel, exc)
        return {}


def _record(stage: PlannedStage, status: str, seconds: float, **extra: Any) -> StageRecord:
    return StageRecord(
        name=stage.id, stage=stage.call.stage_type, key=stage.key, status=status, seconds=round(seconds, 4), **extra
    )
