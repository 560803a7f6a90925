"""The ``edit-video`` flow: validate everything cheap first, plan every stage key, run the DAG,
export the output video and write the run manifest next to it."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import fsspec
from fsspec.implementations.local import LocalFileSystem
from prefect import Flow, flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from core.models import fingerprint_model
from core.video import probe_video
from flows.dag import Outcome, PlannedStage, execute, plan_run
from schemas.calls import SourceRef, StoreSpec
from schemas.errors import InputVideoError, StageFailed
from schemas.loading import validate_spec
from schemas.manifest import RunManifest, SourceRecord
from schemas.pipeline import PipelineSpec
from schemas.settings import Settings
from storage.files import is_local, join_url, normalize_url, write_bytes
from storage.keys import content_key
from storage.leases import Leases
from storage.store import ArtifactStore
from tasks.models import resolve_device, resolve_dtype


@dataclass(frozen=True)
class PreparedRun:
    spec: PipelineSpec
    settings: Settings
    store: ArtifactStore
    source: SourceRef
    size: int
    run_id: str
    planned: list[PlannedStage]


DEFAULT_CONCURRENCY = 2


@flow(
    name="edit-video",
    flow_run_name="{spec.name}",
    task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_CONCURRENCY),
    validate_parameters=True,
)
def edit_video(
    spec: PipelineSpec, input: str | None = None, store: str | None = None, output: str | None = None
) -> RunManifest:
    """Run one pipeline spec on one video; every stage is cached in the store by its key."""
    run = prepare_run(apply_run_options(spec, input=input, store=store, output=output), Settings())
    logger = get_run_logger()
    logger.info("store %s; %d stages planned", run.store.url, len(run.planned))
    started = time.time()
    with Leases(run.store).holding(run.run_id, [p.key for p in run.planned], run.settings.lease_seconds):
        outcomes = execute(run.planned, run.store, result_storage=_result_storage(run.store))
        manifest = finish_run(run, outcomes, started)
    for record in manifest.stages:
        logger.info("%-16s %-9s %7.2fs %s", record.name, record.status, record.seconds, record.key[:12])
    if manifest.status == "failed":
        failed = next(r for r in manifest.stages if r.status == "failed")
        raise StageFailed(f"stage {failed.name!r} failed: {failed.error} (manifest: {manifest.outputs['manifest']})")
    return manifest


def edit_video_with_settings(settings: Settings) -> Flow:
    """``edit_video`` with its task runner sized by ``REELFLOW_MAX_CONCURRENCY``."""
    return edit_video.with_options(task_runner=ThreadPoolTaskRunner(max_workers=settings.max_concurrency))


def apply_run_options(spec: PipelineSpec, **options: str | None) -> PipelineSpec:
    """The spec with ``input``/``store``/``output`` replaced where given, validated again."""
    given = {name: value for name, value in options.items() if value is not None}
    return validate_spec({**spec.model_dump(mode="json", exclude_unset=False), **given}) if given else spec


def check_inputs(spec: PipelineSpec, settings: Settings) -> ArtifactStore:
    """The cheap checks, before any model or Prefect run: store writable, input a readable video, models found."""
    if not spec.input:
        raise InputVideoError(f"pipeline {spec.name!r} has no input video; pass --input VIDEO or set `input:`")
    store = ArtifactStore(spec.store or settings.store, settings.storage_options)
    store.ensure_reachable()
    fs, path = _source_fs(spec.input, settings)
    with fs.open(path, "rb") as handle:
        probe_video(handle)
    for model in spec.models.values():
        fingerprint_model(model.id, model.revision)
    return store


def prepare_run(spec: PipelineSpec, settings: Settings) -> PreparedRun:
    """Check the inputs, hash the source and plan every stage key; nothing heavy runs here."""
    store = check_inputs(spec, settings)
    source, size = hash_source(spec.input, settings)
    run_id = str(flow_run.id or uuid.uuid4())
    dtype = resolve_dtype(settings, resolve_device(settings))
    store_spec = StoreSpec(url=store.url, storage_options=settings.storage_options)
    planned = plan_run(spec, source=source, store=store_spec, run_id=run_id, default_dtype=dtype)
    return PreparedRun(spec, settings, store, source, size, run_id, planned)


def _source_fs(url: str, settings: Settings) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.url_to_fs(normalize_url(url), **({} if is_local(url) else settings.storage_options))
    if not fs.isfile(path):
        raise InputVideoError(f"input video {url!r} does not exist; check the path or URL")
    if fs.size(path) == 0:
        raise InputVideoError(f"input video {url!r} is empty (0 bytes); re-export or re-download it")
    return fs, path


def hash_source(url: str, settings: Settings) -> tuple[SourceRef, int]:
    """The source's content key (sha256 of its size and bytes) and size."""
    fs, path = _source_fs(url, settings)
    local = isinstance(fs, LocalFileSystem)
    resolved = path if local else fs.unstrip_protocol(path)
    options = {} if local else settings.storage_options
    return SourceRef(url=resolved, key=content_key(fs, path), storage_options=options), int(fs.size(path))


def finish_run(run: PreparedRun, outcomes: dict[str, Outcome], started: float) -> RunManifest:
    """Export output videos, gather metrics, write the manifest; returns it."""
    stem = f"{PurePosixPath(run.source.url).stem}.{run.spec.name}"
    outputs = _export_videos(run, outcomes, stem)
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
        input=SourceRecord(url=run.source.url, key=run.source.key, size=run.size),
        store=run.store.url,
        stages=records,
        outputs=outputs,
        metrics=_metrics(run, outcomes),
    )
    outputs["manifest"] = write_bytes(outputs["manifest"], manifest.model_dump_json(indent=2).encode(), _out_opts(run))
    return manifest.model_copy(update={"outputs": outputs})


def _export_videos(run: PreparedRun, outcomes: dict[str, Outcome], stem: str) -> dict[str, str]:
    videos = [(sid, o) for sid, o in outcomes.items() if o.ref is not None and o.ref.stage == "encode_video"]
    outputs = {}
    for stage_id, outcome in videos:
        name = f"{stem}.mp4" if len(videos) == 1 else f"{stem}.{stage_id}.mp4"
        data = bytes(run.store.open("encode_video", outcome.ref.key)["mp4"][:])
        outputs[stage_id] = write_bytes(join_url(run.spec.output, name), data, _out_opts(run))
    return outputs


def _metrics(run: PreparedRun, outcomes: dict[str, Outcome]) -> dict[str, dict]:
    return {
        stage_id: dict(run.store.open("compute_metrics", o.ref.key).attrs.get("metrics", {}))
        for stage_id, o in outcomes.items()
        if o.ref is not None and o.ref.stage == "compute_metrics"
    }


def _out_opts(run: PreparedRun) -> dict:
    return {} if is_local(run.spec.output) else run.settings.storage_options


def _result_storage(store: ArtifactStore) -> Path | None:
    """Keep Prefect's result records beside the artifacts on local stores, so the cache travels with them."""
    return Path(store.abspath("prefect-results")) if store.atomic_rename else None
