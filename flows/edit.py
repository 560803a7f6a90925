"""The ``edit-video`` flow: validate everything cheap first, plan every stage key, run the DAG,
export the output video and write the run manifest next to it."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from prefect import Flow, flow, get_run_logger
from prefect.runtime import flow_run
from prefect.filesystems import RemoteFileSystem, WritableFileSystem

from reelflow.deployments import preset_names, spec_path
from reelflow.flows.dag import Outcome, PlannedStage, execute, plan_run, resolve_models
from reelflow.flows.previews import PREVIEW_FRAMES, side_by_side
from reelflow.flows.reports import edit_report, read_clips, read_edit
from reelflow.flows.runners import default_task_runner, supervised, task_runner
from reelflow.flows.sources import check_sources, hash_sources, without_absent_optional_sources
from reelflow.schemas.calls import SourceRef, StoreSpec
from reelflow.schemas.errors import SpecError, StageFailed
from reelflow.schemas.kinds import Metrics
from reelflow.schemas.loading import load_spec, validate_spec
from reelflow.schemas.manifest import RunCost, RunManifest, SourceRecord, StageRecord
from reelflow.schemas.pipeline import VIDEO, PipelineSpec
from reelflow.schemas.settings import Settings
from reelflow.storage.files import human_bytes, join_url, options_for, write_bytes
from reelflow.storage.keys import canonical_json
from reelflow.storage.leases import Leases
from reelflow.storage.store import ArtifactStore
from reelflow.tasks.artifacts import (EMBED_BYTES, PICTURE_SCHEME, browser_url, clip_label, in_run, markdown_table, picture_markdown,
                                      publish_link, publish_markdown, publish_table, resolve_pictures, summary_path)
from reelflow.tasks.cards import card_links, output_path, republish_card
from reelflow.tasks.preflight import preflight
from reelflow.tasks.models import resolve_device, resolve_dtype


@dataclass(frozen=True)
class PreparedRun:
    spec: PipelineSpec
    settings: Settings
    store: ArtifactStore
    sources: dict[str, SourceRef]
    run_id: str
    planned: list[PlannedStage]

    @property
    def video(self) -> SourceRef:
        return self.sources[VIDEO]


def spec_param(params: dict, field: str) -> Any:
    """A field of the ``spec`` flow parameter, which may still be raw JSON when run names are made."""
    spec = params.get("spec")
    return spec.get(field) if isinstance(spec, dict) else getattr(spec, field, None)


def _run_name() -> str:
    """``<pipeline>: <clip>`` for the UI."""
    params = flow_run.parameters
    name = spec_param(params, "name") or params.get("preset") or "edit"
    source = params.get("input") or spec_param(params, "input")
    return f"{name}: {PurePosixPath(str(source)).stem}" if source else str(name)


@supervised
@flow(
    name="edit-video",
    flow_run_name=_run_name,
    task_runner=default_task_runner(),
    validate_parameters=True,
)
def edit_video(
    spec: PipelineSpec | None = None,
    input: str | None = None,
    store: str | None = None,
    output: str | None = None,
    preset: str | None = None,
    overrides: list[str] = [],  # noqa: B006  (Prefect copies parameters; a list renders as a list form in the UI)
) -> RunManifest:
    """Run one pipeline on one video; every stage is cached in the store by its key.

    Give the pipeline as ``spec`` or as ``preset`` (a preset name such as ``fatezero-style``, or a
    spec file on the worker), with ``overrides`` like ``stages.denoise_latents.params.target_prompt=...``.
    """
    resolved = resolve_spec(spec, preset, overrides)
    run = prepare_run(apply_run_options(resolved, input=input, store=store, output=output), Settings())
    logger = get_run_logger()
    logger.info("store %s; %d stages planned", run.store.url, len(run.planned))
    started = time.time()
    with Leases(run.store).holding(run.run_id, [p.key for p in run.planned], run.settings.lease_seconds):
        outcomes = execute(run.planned, run.store, result_storage=result_storage(run.store))
        manifest = finish_run(run, outcomes, started)
    for record in manifest.stages:
        logger.info("%-16s %-9s %7.2fs %s", record.name, record.status, record.seconds, record.key[:12])
    publish_cached_cards(run, outcomes)
    publish_run(manifest, run.planned, run.store)
    if manifest.status == "failed":
        failed = next(r for r in manifest.stages if r.status == "failed")
        raise StageFailed(f"stage {failed.name!r} failed: {failed.error} (manifest: {manifest.outputs['manifest']})")
    return manifest


def edit_video_with_settings(settings: Settings) -> Flow:
    """``edit_video`` with its task runner chosen by ``REELFLOW_TASK_RUNNER`` / ``REELFLOW_MAX_CONCURRENCY``."""
    return edit_video.with_options(task_runner=task_runner(settings))


def resolve_spec(spec: PipelineSpec | None, preset: str | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineSpec:
    """The pipeline from exactly one of ``spec`` or ``preset``, with ``overrides`` applied and validated."""
    if (spec is None) == (preset is None):
        raise SpecError(
            "give exactly one of `spec` (a pipeline) or `preset` (a preset name or spec file; presets: "
            f"{', '.join(preset_names())})"
        )
    if preset is not None:
        return load_spec(spec_path(preset), overrides)
    return load_spec(spec.model_dump(mode="json"), overrides) if overrides else spec


def apply_run_options(spec: PipelineSpec, **options: str | None) -> PipelineSpec:
    """The spec with ``input``/``store``/``output`` replaced where given, validated again."""
    given = {name: value for name, value in options.items() if value is not None}
    return validate_spec({**spec.model_dump(mode="json", exclude_unset=False), **given}) if given else spec


def check_inputs(spec: PipelineSpec, settings: Settings) -> tuple[ArtifactStore, dict[str, str]]:
    """The cheap checks, before any model or Prefect run: store writable, every source there and readable
    as its kind, models found. Returns the store and the sources' URLs."""
    urls = check_sources(spec, settings)  # before the store is created, so a bad source leaves nothing behind
    return check_environment(spec, settings), urls


def check_environment(spec: PipelineSpec, settings: Settings, *, models: bool = True) -> ArtifactStore:
    """What every clip of a pipeline needs on this machine: a writable store, its models, its GPU limit."""
    store = ArtifactStore(spec.store or settings.store, settings.storage_options)
    store.ensure_reachable()
    task_runner(settings)  # REELFLOW_TASK_RUNNER=dask without prefect-dask is refused here
    if models:
        resolve_models(spec, "float32", settings.model_cache_dir)
        if settings.gpu_limit and any(node.spec.needs_model for node in spec.graph.order()):
            check_concurrency_limit(settings.gpu_limit)
    return store


def check_concurrency_limit(name: str) -> None:
    """Refuse to start when ``REELFLOW_GPU_LIMIT`` names a global concurrency limit the server lacks."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        raise SpecError(
            f"REELFLOW_GPU_LIMIT names the global concurrency limit {name!r}, which the Prefect server does not have; "
            f"create it (prefect gcl create {name} --limit 1) or unset REELFLOW_GPU_LIMIT"
        ) from None
    if not limit.active:
        raise SpecError(f"global concurrency limit {name!r} is inactive; activate it (prefect gcl enable {name})")


def prepare_run(
    spec: PipelineSpec, settings: Settings, *, run_id: str | None = None, hashed: dict[tuple[str, str], SourceRef] | None = None
) -> PreparedRun:
    """Check the inputs, hash the sources, plan every stage key and run the stages' preflight checks
    (a method refusing its input says so here, before any model loads); nothing heavy runs here.

    ``hashed`` carries source hashes between runs prepared together (see :func:`hash_sources`)."""
    spec = without_absent_optional_sources(spec, settings)
    store, urls = check_inputs(spec, settings)
    sources = hash_sources(spec, urls, settings, hashed)
    run_id = run_id or str(flow_run.id or uuid.uuid4())
    dtype = resolve_dtype(settings, resolve_device(settings))
    store_spec = StoreSpec(url=store.url, storage_options=settings.storage_options)
    planned = plan_run(spec, sources=sources, store=store_spec, run_id=run_id, default_dtype=dtype,
                       cache_dir=settings.model_cache_dir)  # fmt: skip
    preflight(planned, settings)
    return PreparedRun(spec, settings, store, sources, run_id, planned)


def finish_run(run: PreparedRun, outcomes: dict[str, Outcome], started: float) -> RunManifest:
    """Export output videos, gather metrics, write the manifest; returns it."""
    stem = f"{PurePosixPath(run.video.url).stem}.{run.spec.name}"
    outputs, metrics = _exports(run, outcomes, stem)
    outputs["manifest"] = join_url(run.spec.output, f"{stem}.manifest.json")
    records = [o.record for o in outcomes.values()]
    finished = time.time()
    manifest = RunManifest(
        run_id=run.run_id,
        pipeline=run.spec.name,
        status="completed" if all(r.status in ("computed", "cached") for r in records) else "failed",
        started_at=started,
        finished_at=finished,
        seconds=round(finished - started, 4),
        spec=run.spec,
        input=_record(run.video),
        sources={name: _record(ref) for name, ref in run.sources.items() if name != VIDEO},
        store=run.store.url,
        stages=records,
        outputs=outputs,
        metrics=metrics,
        cost=RunCost.of(records),
    )
    report = None
    if run.settings.reports:
        report = write_report(join_url(run.spec.output, f"{stem}.report.html"), manifest, run.store, _out_opts(run))
    if report is not None:
        manifest = manifest.model_copy(update={"outputs": {**manifest.outputs, "report": report}})
    written = write_bytes(manifest.outputs["manifest"], manifest.model_dump_json(indent=2).encode(), _out_opts(run))
    return manifest.model_copy(update={"outputs": {**manifest.outputs, "manifest": written}})


def write_report(url: str, manifest: RunManifest, store: ArtifactStore, options: dict) -> str | None:
    """The edit's HTML report at ``url`` (see flows.reports); its URL, or None where it could not be made, which
    never fails the edit: the report is a view of work already stored."""
    try:
        page = edit_report(read_edit(manifest, store))
        return write_bytes(url, page.encode(), options, content_type="text/html; charset=utf-8")
    except Exception as exc:  # noqa: BLE001
        logging.getLogger(__name__).warning("no report for %s: %s: %s", manifest.pipeline, type(exc).__name__, exc)
        return None


def _record(ref: SourceRef) -> SourceRecord:
    return SourceRecord(url=ref.url, key=ref.key, size=ref.size)


def _exports(run: PreparedRun, outcomes: dict[str, Outcome], stem: str) -> tuple[dict[str, str], dict[str, dict]]:
    """What the stages declare as the run's outputs: files written beside the manifest, and metrics."""
    done = [(p, outcomes[p.id].ref) for p in run.planned if outcomes[p.id].ref is not None]
    files = [(p, ref, e) for p, ref in done for e in p.node.spec.exports if e.kind == "file"]
    outputs: dict[str, str] = {}
    for planned, ref, export in files:
        alone = sum(e.suffix == export.suffix for _, _, e in files) == 1
        name = f"{stem}.{export.suffix}" if alone else f"{stem}.{planned.id}.{export.suffix}"
        data = bytes(run.store.open(ref.stage, ref.key)[export.array][:])
        outputs[planned.id] = write_bytes(join_url(run.spec.output, name), data, _out_opts(run))
    metrics = {
        planned.id: dict(Metrics.read(run.store.open(ref.stage, ref.key).attrs).metrics)
        for planned, ref in done
        if any(e.kind == "metrics" for e in planned.node.spec.exports)
    }
    return outputs, metrics


def _out_opts(run: PreparedRun) -> dict:
    return options_for(run.spec.output, run.settings.storage_options)


def result_storage(store: ArtifactStore) -> Path | WritableFileSystem | None:
    """Where Prefect keeps the stages' result records: beside the artifacts, so the cache travels with them.

    A local path on local stores. On object stores a ``RemoteFileSystem`` block over
    ``<store>/prefect-results`` with the store's storage options, saved on the server under a name
    derived from the store (Prefect only accepts saved blocks); put credentials in the workers'
    environment rather than in storage options, since a block's settings live in the server database.
    memory:// stores are per process, so their records stay in Prefect's default storage.
    """
    if store.atomic_rename:
        return Path(store.abspath("prefect-results"))
    if "memory" in (store.fs.protocol if isinstance(store.fs.protocol, tuple) else (store.fs.protocol,)):
        return None
    name = "reelflow-results-" + hashlib.sha256(f"{store.url}|{canonical_json(store.storage_options)}".encode()).hexdigest()[:12]
    block = RemoteFileSystem(basepath=store.url_of("prefect-results"), settings=store.storage_options)
    block.save(name, overwrite=True)
    return block


def publish_cached_cards(run: PreparedRun, outcomes: dict[str, Outcome]) -> None:
    """Each cached stage's card again, in this run (its computing run's card, named as that run's)."""
    for planned in run.planned:
        if outcomes[planned.id].record.status == "cached":
            republish_card(planned.call, run.store, run.settings)


def publish_run(manifest: RunManifest, planned: list[PlannedStage] | None = None, store: ArtifactStore | None = None) -> None:
    """The edit's summary in the UI: the source and output playing side by side (with the ``store``), every stage
    with its status, key, artifact and a link to its card (where the UI's address is known), the outputs, the
    metrics."""
    stem = PurePosixPath(manifest.input.url).stem
    clip = clip_label(manifest.input.url)  # the URL's hash keeps intro.mp4 of one folder apart from another's
    done = {r.name for r in manifest.stages if r.status in ("computed", "cached")}
    links = card_links({p.id: p.call for p in planned or () if p.id in done})
    records = {r.name: r for r in manifest.stages}
    rows = [(f"[`{r.name}`]({links[r.name]})" if links.get(r.name) else f"`{r.name}`", r.stage, r.status, f"{r.seconds:.2f} s",
             _size(r.peak_memory), _size(r.bytes), f"`{r.key[:12]}`", _artifact_cell(r, store))
            for r in manifest.stages]  # fmt: skip
    cost = manifest.cost
    spent = (f"; computed {cost.computed_seconds:.1f} s, stored {human_bytes(cost.stored_bytes)}, reused "
             f"{human_bytes(cost.reused_bytes)} ({cost.reused_seconds:.1f} s saved)") if cost else ""  # fmt: skip
    lines = [
        f"### {manifest.pipeline} on `{manifest.input.url}`: {manifest.status} in {manifest.seconds:.1f} s{spent}",
        "",
        *((preview, "") if (preview := _preview(manifest, store)) else ()),
        markdown_table(("stage", "type", "status", "time", "peak memory", "bytes", "key", "artifact"), rows),
        "",
        *(f"- {name}: `{url}`{_open_link(records.get(name), url, store)}" for name, url in manifest.outputs.items()),
    ]
    markdown = "\n".join(lines)
    if store is not None:  # store paths as links the browser opens (served or presigned)
        try:
            markdown = resolve_pictures(markdown, store, Settings())
        except Exception as exc:  # noqa: BLE001  (a view of work already done)
            logging.getLogger(__name__).warning("the summary's links are not resolved: %s", exc)
    publish_markdown(f"edit-{clip}-{manifest.pipeline}", markdown, description=f"{manifest.pipeline}: {stem}")
    metrics = [
        {"stage": stage_id, "metric": name, "value": value}
        for stage_id, values in manifest.metrics.items()
        for name, value in values.items()
    ]
    publish_table(f"metrics-{clip}-{manifest.pipeline}", metrics, description=f"{manifest.pipeline}: {stem}")
    if "report" in manifest.outputs:
        publish_link(f"report-{clip}-{manifest.pipeline}", browser_url(manifest.outputs["report"], Settings()),
                     f"{manifest.pipeline} on {stem}: report", description="source and output, pictures, metrics, costs")  # fmt: skip


def _preview(manifest: RunManifest, store: ArtifactStore | None) -> str | None:
    """Markdown of the source (left) and output (right) playing side by side, kept beside the output's pictures."""
    if store is None or not in_run():
        return None
    try:
        source, output, record = read_clips(manifest, store, limit=PREVIEW_FRAMES)
        if output is None:
            return None
        settings = Settings()
        embedded = settings.pictures_url is None and store.atomic_rename  # no server, no presigning: a data URL
        webp = side_by_side(source, output, max_bytes=EMBED_BYTES if embedded else None)
        kept = picture_markdown(store, record.stage, record.key, "preview", webp, suffix="webp")
        return resolve_pictures(kept.replace("![preview]", "![source and output]"), store, settings)
    except Exception as exc:  # noqa: BLE001  (a view of work already done)
        logging.getLogger(__name__).warning("no preview for %s: %s", manifest.pipeline, exc)
        return None


def _artifact_cell(record: StageRecord, store: ArtifactStore | None) -> str:
    """A stage's artifact in the summary: a link to its summary as JSON (once resolved) where one is kept, else its
    path."""
    rel = summary_path(record.stage, record.key)
    if store is None or record.artifact is None or not _kept(store, rel):
        return f"`{record.artifact or record.error or ''}`"
    return f"[{record.stage}/{record.key[:12]}]({PICTURE_SCHEME}{rel})"


def _open_link(record: StageRecord | None, url: str, store: ArtifactStore | None) -> str:
    """`` ([open](...))``, linking the copy of an output file its stage kept beside its card, where one is kept."""
    if store is None or record is None or record.artifact is None:
        return ""
    rel = output_path(record.stage, record.key, PurePosixPath(url).suffix.lstrip("."))
    return f" ([open]({PICTURE_SCHEME}{rel}))" if _kept(store, rel) else ""


def _kept(store: ArtifactStore, rel: str) -> bool:
    try:
        return bool(store.fs.exists(store.abspath(rel)))
    except Exception:  # noqa: BLE001
        return False


def _size(value: int | None) -> str:
    return "" if value is None else human_bytes(value)
