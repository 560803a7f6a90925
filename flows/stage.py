"""The ``run-stage`` flow: one stage of one edit, against inputs already in the store.

Deployed once per work pool (``run-stage/gpu``, ``run-stage/cpu``), it lets a GPU worker rerun
just the denoising of an edit whose decode and inversion a CPU worker (or an earlier run) stored.
The stage's key is planned exactly as ``edit-video`` plans it, so its output lands where the full
pipeline looks for it, and a later ``edit-video`` run finds it cached.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from reelflow.flows.dag import PlannedStage
from reelflow.flows.edit import apply_run_options, prepare_run, resolve_spec, result_storage
from reelflow.schemas.errors import ArtifactNotFound, LeaseHeld, SpecError
from reelflow.schemas.pipeline import PipelineSpec
from reelflow.schemas.refs import ArtifactRef
from reelflow.schemas.settings import Settings
from reelflow.storage.leases import Leases
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import task_for
from reelflow.tasks.cards import republish_card


def _run_name() -> str:
    params = flow_run.parameters
    return f"{params.get('stage', 'stage')}: {params.get('input') or 'spec input'}"


@flow(name="run-stage", flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=1), validate_parameters=True)
def run_stage(
    stage: str,
    spec: PipelineSpec | None = None,
    preset: str | None = None,
    overrides: list[str] = [],  # noqa: B006  (Prefect copies parameters)
    input: str | None = None,
    store: str | None = None,
    recompute: bool = False,
) -> ArtifactRef:
    """Run the stage with id ``stage`` of the pipeline on ``input``; its inputs must be in the store.

    ``recompute`` deletes the stage's stored artifact first (its key stays the same, so this is for
    a result you distrust, e.g. after a driver change); otherwise a stored artifact is returned as is.
    """
    pipeline = apply_run_options(resolve_spec(spec, preset, overrides), input=input, store=store)
    run = prepare_run(pipeline, Settings())
    target = pick_stage(run.planned, stage)
    check_stored_inputs(run.store, run.planned, target)
    logger = get_run_logger()
    leases = Leases(run.store)
    with leases.holding(run.run_id, [target.key], run.settings.lease_seconds):
        if recompute and run.store.is_complete(target.call.stage_type, target.key):
            held = [h for h in leases.holders(target.key) if h != run.run_id]
            if held:
                raise LeaseHeld(f"{target.id} {target.key[:12]} is in use by running edits ({', '.join(held)}); "
                                "recompute it when they finish")  # fmt: skip
            logger.info("removing the stored %s %s to recompute it", target.id, target.key[:12])
            run.store.remove(run.store.artifact_path(target.call.stage_type, target.key))
        complete = run.store.is_complete(target.call.stage_type, target.key)
        options: dict = {"refresh_cache": not complete}
        storage = result_storage(run.store)
        if storage is not None:
            options["result_storage"] = storage
        ref: ArtifactRef = task_for(target.call.stage).with_options(**options)(call=target.call)
    if complete:  # stored before: its card, as the run that computed it left it
        republish_card(target.call, run.store, run.settings)
    logger.info("%s %s -> %s", target.id, target.key[:12], run.store.url_of(ref.path))
    return ref


def pick_stage(planned: list[PlannedStage], stage_id: str) -> PlannedStage:
    for stage in planned:
        if stage.id == stage_id:
            return stage
    copies = [p.id for p in planned if p.id.rsplit("_", 1)[0] == stage_id and p.id.rsplit("_", 1)[-1].isdigit()]
    if copies:
        raise SpecError(f"stage {stage_id!r} is repeated by `each:`; name one copy: {', '.join(copies)}")
    raise SpecError(f"the pipeline has no stage {stage_id!r}; its stages are {', '.join(p.id for p in planned)}")


def check_stored_inputs(store: ArtifactStore, planned: list[PlannedStage], target: PlannedStage) -> None:
    """Every input of ``target`` must be complete in the store; the error names the stage to run first."""
    by_id = {p.id: p for p in planned}
    for slot, source_id in target.node.inputs.items():
        source = by_id[source_id]
        if not store.is_complete(source.call.stage_type, source.key):
            raise ArtifactNotFound(
                f"input {slot!r} of {target.id!r} (stage {source_id!r}, key {source.key[:12]}) is not in {store.url}; "
                f"run the edit-video flow, or run-stage with stage={source_id!r}, first"
            )
