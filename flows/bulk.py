"""The ``bulk-edit`` flow: one edit per clip of a media library, with bounded fan-out.

The library is an fsspec glob (``s3://media/incoming/**/*.mp4``), a directory (every video under
it), or a manifest file listing one clip per line (``.txt``) or a JSON list (``.json``); relative
entries are resolved against the manifest's directory. Outputs mirror the library's folders under
``output``, so two ``intro.mp4`` in different folders never collide.

Each clip runs as its own ``edit-video`` flow run: in this process (a subflow) or, with
``dispatch``, as a run of that deployment on its own work pool, so a CPU orchestrator can feed
GPU workers. A failing clip fails only its own run. A clip whose edit already exists (a completed
manifest for the same pipeline and an unchanged source, its videos present) is skipped, so rerunning
after a fix computes only what is missing; clips that do run still reuse every cached stage.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

import fsspec
from prefect import flow, get_run_logger, task
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field, ValidationError

from reelflow.flows.dag import plan_run
from reelflow.flows.edit import apply_run_options, check_environment, edit_video, resolve_spec, spec_param
from reelflow.flows.sources import source_overrides, source_urls, without_absent_optional_sources
from reelflow.schemas.base import Model
from reelflow.schemas.calls import SourceRef, StoreSpec
from reelflow.schemas.errors import ModelError, SourceError, SpecError, StageFailed
from reelflow.schemas.loading import load_spec
from reelflow.schemas.manifest import RunManifest
from reelflow.schemas.pipeline import VIDEO, PipelineSpec
from reelflow.schemas.settings import Settings
from reelflow.storage.files import join_url, normalize_url, options_for, url_to_fs, write_bytes
from reelflow.tasks.artifacts import publish_table
from reelflow.tasks.models import resolve_device, resolve_dtype

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
_WILDCARDS = "*?["
MAX_CONCURRENCY = 64


class ClipResult(Model):
    """One row of the bulk report."""

    clip: str
    status: Literal["completed", "failed", "exists"]
    output: str | None = None
    manifest: str | None = None
    computed: list[str] = Field(default_factory=list, description="Stages this run computed.")
    cached: list[str] = Field(default_factory=list, description="Stages served from the store.")
    seconds: float = 0.0
    metrics: dict[str, float] = Field(default_factory=dict)
    error: str | None = None


class BulkReport(Model):
    """What a bulk edit did to every clip of the library."""

    pipeline: str
    library: str
    output: str
    clips: list[ClipResult]

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.clips)


@dataclass(frozen=True)
class Clip:
    url: str
    folder: str  # relative to the library root, "" at the top
    sources: tuple[tuple[str, str], ...] = ()  # (source name, URL) from a manifest object
    overrides: tuple[str, ...] = ()  # this clip's own spec overrides, from a manifest object

    @property
    def stem(self) -> str:
        return PurePosixPath(self.url).stem


def _run_name() -> str:
    params = flow_run.parameters
    name = spec_param(params, "name") or params.get("preset")
    library = str(params.get("library", "?"))
    return f"{name or 'bulk'}: {library if len(library) <= 48 else '...' + library[-45:]}"


@flow(
    name="bulk-edit",
    flow_run_name=_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_CONCURRENCY),
    validate_parameters=True,
)
def bulk_edit(
    library: str,
    spec: PipelineSpec | None = None,
    preset: str | None = None,
    overrides: list[str] = [],  # noqa: B006  (Prefect copies parameters)
    output: str | None = None,
    store: str | None = None,
    concurrency: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] = 2,
    skip_existing: bool = True,
    dispatch: str | None = None,
) -> BulkReport:
    """Edit every clip of ``library`` with one pipeline (``spec``, or ``preset`` plus ``overrides``).

    ``concurrency`` edits run at once. ``dispatch`` names an edit-video deployment (e.g.
    ``edit-video/default``) to run each clip on that deployment's work pool instead of here.
    """
    logger = get_run_logger()
    pipeline = resolve_spec(spec, preset, overrides)
    settings = Settings()
    root = normalize_url(output or pipeline.output)
    clips = [c for c in list_library(library, settings) if not c.url.startswith(root.rstrip("/") + "/")]
    if not clips:
        raise SpecError(f"library {library!r} holds no clips outside the output folder {root!r}")
    # Once, before any clip: the store, and the models here unless the edits run on another pool.
    check_environment(apply_run_options(pipeline, store=store), settings, models=dispatch is None)
    if dispatch is not None:
        check_deployment(dispatch)
    logger.info("%d clips in %s; %s -> %s", len(clips), library, pipeline.name, root)

    results: dict[str, ClipResult] = {}
    todo: list[tuple[Clip, PipelineSpec]] = []
    for clip in clips:
        try:
            clip_spec = clip_pipeline(pipeline, clip, store=store, output=_output_dir(root, clip))
            clip_spec = without_absent_optional_sources(clip_spec, settings)
        except SpecError as exc:
            results[clip.url] = ClipResult(clip=clip.url, status="failed", error=f"{type(exc).__name__}: {exc}")
            continue
        done = existing_edit(clip, clip_spec, settings) if skip_existing else None
        if done is not None:
            results[clip.url] = done
        else:
            todo.append((clip, clip_spec))
    logger.info("%d already edited, %d to run, %d at a time", len(results), len(todo), concurrency)
    for clip, result in _fan_out(todo, concurrency, dispatch):
        results[clip.url] = result
        logger.info("%s: %s in %.1fs %s", clip.stem, result.status, result.seconds, result.error or "")

    report = BulkReport(
        pipeline=pipeline.name, library=library, output=root, clips=[results[c.url] for c in clips]
    )
    publish_report(report)
    failed = [c for c in report.clips if c.status == "failed"]
    if failed:
        listed = "; ".join(f"{PurePosixPath(c.clip).name} ({c.error})" for c in failed)
        raise StageFailed(
            f"{len(failed)} of {len(clips)} clips failed: {listed}. Fix them and rerun; finished clips are skipped"
        )
    return report


def clip_pipeline(pipeline: PipelineSpec, clip: Clip, *, store: str | None, output: str) -> PipelineSpec:
    """The pipeline for one clip: its video, output folder, the sources and overrides its manifest entry gives."""
    spec = apply_run_options(pipeline, input=clip.url, store=store, output=output)
    given = [*clip.overrides, *source_overrides(spec, dict(clip.sources))]
    return load_spec(spec.model_dump(mode="json"), given) if given else spec


def check_deployment(name: str) -> None:
    """``dispatch`` must name a deployment the server has, as ``<flow>/<deployment>``."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    if name.count("/") != 1:
        raise SpecError(f"dispatch {name!r} is not a deployment name; use <flow>/<deployment>, e.g. edit-video/default")
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise SpecError(
            f"dispatch names the deployment {name!r}, which the Prefect server does not have; deploy it "
            "(prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml) or set dispatch to null "
            "to edit in this run"
        ) from None


# the library ---------------------------------------------------------------------------------


def list_library(library: str, settings: Settings) -> list[Clip]:
    """The clips of a library URL (glob, directory or manifest file), each with its folder; in order."""
    fs, path = url_to_fs(library, settings.storage_options)
    if any(ch in path for ch in _WILDCARDS):
        base = path[: min(path.find(ch) for ch in _WILDCARDS if ch in path)].rsplit("/", 1)[0]
        found = [(p, base) for p in sorted(fs.glob(path)) if fs.isfile(p)]
    elif fs.isdir(path):
        found = [(p, path) for p in sorted(fs.find(path)) if p.lower().endswith(VIDEO_SUFFIXES)]
    elif fs.isfile(path):
        base = path.rsplit("/", 1)[0]
        found = [(entry, base) for entry in _manifest_entries(fs, path, base)]
    else:
        raise SpecError(f"library {library!r} does not exist; give a directory, a glob such as 'clips/*.mp4', "
                        "or a manifest file (.txt, one clip per line, or .json, a list)")  # fmt: skip
    if not found:
        raise SpecError(f"library {library!r} holds no clips; check the glob or the manifest")
    clips = [_clip(fs, entry, base) for entry, base in found]
    check_unique(clips)
    return clips


def _clip(fs: fsspec.AbstractFileSystem, entry: str | dict, base: str) -> Clip:
    if isinstance(entry, str):
        return Clip(_url(fs, entry), _folder(entry, base))
    sources = tuple((name, _url(fs, _resolve(value, base))) for name, value in entry.items() if name not in _ENTRY_KEYS)
    video = _resolve(entry[VIDEO], base)
    return Clip(_url(fs, video), _folder(video, base), sources, tuple(entry.get("overrides", ())))


_ENTRY_KEYS = (VIDEO, "overrides")


def _manifest_entries(fs: fsspec.AbstractFileSystem, path: str, base: str) -> list[str | dict]:
    """A manifest's clips: paths, or (``.json``) objects ``{"video": ..., "<source>": ..., "overrides": [...]}``."""
    if path.lower().endswith(VIDEO_SUFFIXES):
        raise SpecError(f"library {path!r} is a single video; use the edit-video flow, or a glob or manifest here")
    try:
        text = fs.cat_file(path).decode()
    except UnicodeDecodeError:
        raise SpecError(f"library manifest {path!r} is not text; list one clip per line (.txt) or a JSON list") from None
    if path.lower().endswith(".json"):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"library manifest {path!r} is not valid JSON ({exc}); give a list of clip paths") from None
        if not (isinstance(entries, list) and all(_valid_entry(e) for e in entries)):
            raise SpecError(
                f"library manifest {path!r} must be a JSON list of clip paths, or of objects with a `video` path, "
                'source paths by name and optional `overrides`, e.g. {"video": "a.mp4", "edited_frame": "a.png"}'
            )
    else:
        entries = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [_resolve(e, base) if isinstance(e, str) else e for e in entries]


def _valid_entry(entry: object) -> bool:
    if isinstance(entry, str):
        return True
    if not isinstance(entry, dict) or not isinstance(entry.get(VIDEO), str):
        return False
    overrides = entry.get("overrides", [])
    paths = [v for k, v in entry.items() if k != "overrides"]
    return isinstance(overrides, list) and all(isinstance(o, str) for o in overrides) and all(isinstance(v, str) for v in paths)


def _resolve(entry: str, base: str) -> str:
    if "://" in entry or entry.startswith("/"):
        return entry
    return posixpath.normpath(f"{base}/{entry}")


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if "://" in path:
        return path
    return path if "file" in fs.protocol or fs.protocol == "local" else fs.unstrip_protocol(path)


def _folder(path: str, base: str) -> str:
    path = path.split("://", 1)[-1]
    base = base.split("://", 1)[-1].rstrip("/")
    parent = path.rsplit("/", 1)[0]
    if base and (parent == base or parent.startswith(base + "/")):
        return parent[len(base) :].strip("/")
    return ""


def check_unique(clips: list[Clip]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for clip in clips:
        other = seen.setdefault((clip.folder, clip.stem), clip.url)
        if other != clip.url:
            raise SpecError(
                f"clips {other!r} and {clip.url!r} would write the same outputs ({clip.folder or '.'}/{clip.stem}.*); "
                "rename one, or list them from a manifest in a folder that contains both (their sub-folders are kept)"
            )


def _output_dir(root: str, clip: Clip) -> str:
    return join_url(root, clip.folder) if clip.folder else root


def manifest_url(spec: PipelineSpec, clip: Clip) -> str:
    return join_url(spec.output, f"{clip.stem}.{spec.name}.manifest.json")


def existing_edit(clip: Clip, spec: PipelineSpec, settings: Settings) -> ClipResult | None:
    """The finished edit of ``clip`` with ``spec`` if its manifest and videos are there, else None.

    "Finished" means a completed manifest of the same pipeline (stages, models, seed) whose sources
    (the video and any sidecars) have the same sizes and were not modified since that edit started;
    the outputs it names must still exist. (Hashing every source again would read the whole library
    each night.)
    """
    try:
        manifest = read_manifest(manifest_url(spec, clip), settings)
    except (FileNotFoundError, ValidationError):
        return None
    fields = {"input", "output", "store", "description"}
    if manifest.status != "completed" or manifest.spec.model_dump(exclude=fields) != spec.model_dump(exclude=fields):
        return None
    if not _sources_unchanged(manifest, spec, settings):
        return None
    videos = [v for name, v in manifest.outputs.items() if name != "manifest"]
    if not videos or not all(_fs(v, settings)[0].isfile(_fs(v, settings)[1]) for v in videos):
        return None
    if not _same_keys(manifest, spec, settings):
        return None
    return _result(clip, manifest, status="exists", seconds=0.0)


def _sources_unchanged(manifest: RunManifest, spec: PipelineSpec, settings: Settings) -> bool:
    try:
        urls = source_urls(spec)
    except SourceError:
        return False
    records = {VIDEO: manifest.input, **manifest.sources}
    for name, url in urls.items():
        fs, path = _fs(url, settings)
        if name not in records or not fs.isfile(path) or fs.size(path) != records[name].size:
            return False
        if _modified(fs, path) > manifest.started_at:  # replaced since (same size or not)
            return False
    return True


def _same_keys(manifest: RunManifest, spec: PipelineSpec, settings: Settings) -> bool:
    """Whether planning ``spec`` now gives the stage keys the manifest recorded (a retrained model
    or a new stage version changes them). Planned from the recorded source key, so nothing is
    re-hashed; tried with each default dtype, since the worker that ran the edit picked its own.
    Where the models cannot be found here (a CPU orchestrator dispatching to GPU workers), the
    pipeline comparison already made has to do."""
    kinds = spec.source_kinds
    records = {VIDEO: manifest.input, **manifest.sources}
    if set(spec.used_sources()) - set(records):
        return False
    sources = {n: SourceRef(url=r.url, key=r.key, kind=kinds[n], size=r.size) for n, r in records.items() if n in kinds}
    recorded = {r.name: r.key for r in manifest.stages}
    local = resolve_dtype(settings, resolve_device(settings))
    try:
        for dtype in dict.fromkeys([local, "float16", "float32", "bfloat16"]):
            planned = plan_run(spec, sources=sources, store=StoreSpec(url=manifest.store), run_id="", default_dtype=dtype,
                               cache_dir=settings.model_cache_dir)
            if {p.id: p.key for p in planned} == recorded:
                return True
    except (ModelError, SpecError):
        return True
    return False


def _modified(fs: fsspec.AbstractFileSystem, path: str) -> float:
    """The file's modification time (unix seconds), or 0 where the filesystem cannot tell."""
    try:
        return fs.modified(path).timestamp()
    except (NotImplementedError, OSError, AttributeError):
        return 0.0


def _fs(url: str, settings: Settings) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(url, settings.storage_options)


# fan-out -------------------------------------------------------------------------------------


class EditRunFailed(StageFailed):
    """A dispatched edit-video run did not complete; the message is that run's own error."""


_PREFECT_PREFIX = "Flow run encountered an exception: "


@task(name="edit-clip", task_run_name="{clip.stem}", retries=0)
def edit_clip(clip: Clip, spec: PipelineSpec, dispatch: str | None) -> ClipResult:
    """One clip's edit: a subflow here, or a run of the ``dispatch`` deployment on its own pool."""
    started = time.perf_counter()
    if dispatch is None:
        manifest = edit_video(spec=spec)
        return _result(clip, manifest, status="completed", seconds=time.perf_counter() - started)
    from prefect.deployments import run_deployment

    # The whole resolved spec travels; preset and overrides are cleared in case the deployment has defaults.
    parameters = {"spec": spec.model_dump(mode="json"), "preset": None, "overrides": []}
    run = run_deployment(dispatch, parameters=parameters, as_subflow=True, timeout=None)
    if not run.state or not run.state.is_completed():
        message = (run.state.message or run.state.name) if run.state else "no state"
        raise EditRunFailed(f"{message.removeprefix(_PREFECT_PREFIX)} (flow run {run.name!r} of {dispatch})")
    manifest = read_manifest(manifest_url(spec, clip), Settings())
    return _result(clip, manifest, status="completed", seconds=time.perf_counter() - started)


def _fan_out(
    todo: list[tuple[Clip, PipelineSpec]], concurrency: int, dispatch: str | None
) -> Iterator[tuple[Clip, ClipResult]]:
    """Run at most ``concurrency`` edits at once; yield each clip's result as it finishes."""
    pending = list(todo)
    running: dict[PrefectFuture, tuple[Clip, PipelineSpec, float]] = {}
    while pending or running:
        while pending and len(running) < concurrency:
            clip, spec = pending.pop(0)
            running[edit_clip.submit(clip, spec, dispatch)] = (clip, spec, time.time())
        future = next(iter(as_completed(list(running))))
        clip, spec, started = running.pop(future)
        yield clip, _settle(future, clip, spec, started)


def _settle(future: PrefectFuture, clip: Clip, spec: PipelineSpec, started: float) -> ClipResult:
    future.wait()
    if future.state.is_completed():
        return future.result()
    seconds = time.time() - started
    error = future.state.result(raise_on_failure=False)
    if isinstance(error, EditRunFailed):
        message = str(error)
    elif isinstance(error, BaseException):
        message = f"{type(error).__name__}: {error}"
    else:
        message = str(future.state.message)
    try:  # a failed stage still leaves this run's manifest, which says what was done
        manifest = read_manifest(manifest_url(spec, clip), Settings())
        if manifest.finished_at >= started:
            return _result(clip, manifest, status="failed", seconds=seconds, error=message)
    except (FileNotFoundError, ValidationError):
        pass
    return ClipResult(clip=clip.url, status="failed", seconds=round(seconds, 2), error=message)


def read_manifest(url: str, settings: Settings) -> RunManifest:
    fs, path = _fs(url, settings)
    return RunManifest.model_validate_json(fs.cat_file(path))


def _result(clip: Clip, manifest: RunManifest, *, status: str, seconds: float, error: str | None = None) -> ClipResult:
    videos = [url for name, url in manifest.outputs.items() if name != "manifest"]
    metrics = {
        (name if len(manifest.metrics) == 1 else f"{stage_id}.{name}"): value
        for stage_id, values in manifest.metrics.items()
        for name, value in values.items()
    }
    return ClipResult(
        clip=clip.url,
        status=status,
        output=videos[0] if videos else None,
        manifest=manifest.outputs.get("manifest"),
        # A skipped clip ran nothing now; what an earlier run did is in its manifest.
        computed=[r.name for r in manifest.stages if r.status == "computed" and status != "exists"],
        cached=[r.name for r in manifest.stages if r.status == "cached" and status != "exists"],
        seconds=round(seconds, 2),
        metrics=metrics,
        error=error,
    )


# the report ----------------------------------------------------------------------------------


def publish_report(report: BulkReport) -> None:
    """The table artifact ``bulk-<pipeline>`` (one row per clip) and ``<pipeline>.bulk.json`` beside the outputs."""
    names = sorted({name for clip in report.clips for name in clip.metrics})
    rows: list[dict[str, Any]] = []
    for clip in report.clips:
        row = {
            "clip": clip.clip,
            "status": clip.status,
            "output": clip.output or "",
            "computed": ", ".join(clip.computed) or "-",
            "cached": ", ".join(clip.cached) or "-",
            "seconds": clip.seconds,
        }
        row.update({name: round(clip.metrics[name], 4) if name in clip.metrics else "" for name in names})
        row["error"] = clip.error or ""
        rows.append(row)
    summary = f"{report.count('completed')} edited, {report.count('exists')} already done, {report.count('failed')} failed"
    publish_table(f"bulk-{report.pipeline}", rows, description=f"{report.pipeline} over {report.library}: {summary}")
    settings = Settings()
    url = join_url(report.output, f"{report.pipeline}.bulk.json")
    write_bytes(url, report.model_dump_json(indent=2).encode(), options_for(url, settings.storage_options))
