"""The ``compare-methods`` flow: several pipelines on the same clips, one table.

Every method runs on every clip. Every (method, clip) edit is prepared first (sources checked and
hashed once per file, keys planned, preflight run), so a bad spec or clip stops the comparison
before any model loads. Then all the edits' stages run as one DAG: a stage two methods share on a
clip (decode, VAE encoding, depth, flow: same params, models and inputs, so the same key) is
computed once, and every edit after the first reads it from the store. Each edit still gets its own output video, manifest and report; the
comparison writes ``<name>.csv`` and ``<name>.json`` (one row per method and clip: metrics, costs,
seed, models, frame count and resolution), a table artifact and the report ``<name>.html``.

The edits share the flow's task runner (``REELFLOW_MAX_CONCURRENCY`` stages at once over all of
them), so a stage's seconds and peak memory are its own only when stages run one at a time: set
``REELFLOW_MAX_CONCURRENCY=1`` for costs to compare methods by.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
import uuid
from pathlib import PurePosixPath
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from reelflow.deployments import spec_path
from reelflow.flows.bulk import Clip, check_unique, clip_pipeline, list_library
from reelflow.flows.dag import execute_runs
from reelflow.flows.edit import PreparedRun, finish_run, prepare_run, publish_cached_cards, publish_run, result_storage
from reelflow.flows.reports import EditView, Raw, comparison_report, html_table, link, read_edit
from reelflow.flows.runners import default_task_runner, supervised
from reelflow.schemas.calls import SourceRef
from reelflow.schemas.errors import SpecError, StageFailed
from reelflow.schemas.loading import load_spec
from reelflow.schemas.manifest import COMPARISON_NAME, Comparison, ComparisonRow, RunManifest, StageRecord
from reelflow.schemas.pipeline import PipelineSpec
from reelflow.schemas.settings import Settings
from reelflow.storage.files import human_bytes, join_url, normalize_url, options_for, url_to_fs, write_bytes
from reelflow.storage.leases import Leases
from reelflow.tasks.artifacts import browser_url, publish_link, publish_table


def _run_name() -> str:
    params = flow_run.parameters
    labels = [str(m).partition("=")[0] for m in params.get("methods") or []]
    labels += [s.get("name", "?") if isinstance(s, dict) else getattr(s, "name", "?") for s in params.get("specs") or []]
    return f"{params.get('name') or 'comparison'}: {' vs '.join(labels) or '?'}"


@supervised
@flow(name="compare-methods", flow_run_name=_run_name, task_runner=default_task_runner(), validate_parameters=True)
def compare_methods(
    methods: list[str] = [],  # noqa: B006  (Prefect copies parameters)
    specs: list[PipelineSpec] = [],  # noqa: B006
    clips: list[str] = [],  # noqa: B006
    overrides: list[str] = [],  # noqa: B006
    store: str | None = None,
    output: str | None = None,
    name: Annotated[str, Field(pattern=COMPARISON_NAME)] = "comparison",
) -> Comparison:
    """Run every method on every clip, sharing the stages they have in common, and tabulate metrics and costs.

    ``methods`` are preset names or spec files, each optionally labelled (``strong=fatezero-style``: the label
    becomes the pipeline's name); ``specs`` are pipelines given whole. ``clips`` are videos, folders, globs or
    library manifests (a JSON manifest gives each clip's sources, and overrides that every method must accept);
    without them, every clip any spec names as ``input``. ``overrides`` apply to every method (``KEY=VALUE``)
    or to one (``LABEL:KEY=VALUE``).
    """
    logger = get_run_logger()
    settings = Settings()
    pipelines = resolve_methods(methods, specs, overrides)
    root = normalize_url(output or pipelines[0].output)
    store = store or _one_store(pipelines)
    clip_list = _clips(clips, pipelines, root, settings)
    run_id = str(flow_run.id or uuid.uuid4())
    hashed: dict[tuple[str, str], SourceRef] = {}
    runs: list[PreparedRun] = []
    for clip in clip_list:  # every edit prepared before any runs: a bad one stops the comparison here
        for pipeline in pipelines:
            spec = _clip_spec(pipeline, clip, store=store, output=join_url(root, clip.folder) if clip.folder else root)
            runs.append(prepare_run(spec, settings, run_id=run_id, hashed=hashed))
    planned = sum(len(r.planned) for r in runs)
    unique = len({p.key for r in runs for p in r.planned})
    logger.info("%d methods x %d clips: %d stages planned, %d distinct", len(pipelines), len(clip_list), planned, unique)

    started = time.time()
    keys = [p.key for r in runs for p in r.planned]
    with Leases(runs[0].store).holding(run_id, keys, settings.lease_seconds):
        outcomes = execute_runs([r.planned for r in runs], runs[0].store, result_storage=result_storage(runs[0].store))
        manifests = [finish_run(run, outcome, started) for run, outcome in zip(runs, outcomes, strict=True)]
    for run, outcome, manifest in zip(runs, outcomes, manifests, strict=True):
        publish_cached_cards(run, outcome)
        publish_run(manifest, run.planned, run.store)
    comparison = write_comparison(name, root, runs, manifests, settings, seconds=time.time() - started)
    logger.info("wrote %s", ", ".join(comparison.outputs.values()))
    failed = [row for row in comparison.rows if row.status != "completed"]
    if failed:
        listed = "; ".join(f"{row.method} on {PurePosixPath(row.clip).name}: {row.error}" for row in failed)
        table = comparison.outputs["csv"]
        raise StageFailed(f"{len(failed)} of {len(comparison.rows)} edits failed: {listed} (table: {table})")
    return comparison


def resolve_methods(methods: list[str], specs: list[PipelineSpec], overrides: list[str]) -> list[PipelineSpec]:
    """The pipelines to compare, each named by its label, with the overrides for all and for each applied."""
    if not methods and not specs:
        raise SpecError("nothing to compare; name presets or spec files (e.g. fatezero-local videoshop), or give specs")
    shared = [o for o in overrides if not _targeted(o)]
    targeted: dict[str, list[str]] = {}
    for item in overrides:
        if _targeted(item):
            label, _, rest = item.partition(":")
            targeted.setdefault(label, []).append(rest)
    labelled = []
    for item in methods:
        label, sep, preset = item.partition("=")
        labelled.append((label if sep else None, preset if sep else item))
    pipelines = []
    for label, preset in labelled:
        base = load_spec(spec_path(preset))
        label = label or base.name
        named = [f"name={label}"] if label != base.name else []
        pipelines.append(load_spec(spec_path(preset), [*named, *shared, *targeted.get(label, ())]))
    for spec in specs:
        given = [*shared, *targeted.get(spec.name, ())]
        pipelines.append(load_spec(spec.model_dump(mode="json"), given) if given else spec)
    names = [p.name for p in pipelines]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpecError(f"methods {', '.join(twice)} are named twice, so their outputs would collide; label them, e.g. "
                        f"{twice[0]}-a={twice[0]} {twice[0]}-b=other.yaml")  # fmt: skip
    unknown = sorted(set(targeted) - set(names))
    if unknown:
        raise SpecError(f"--set {unknown[0]}:... names no method being compared ({', '.join(names)})")
    return pipelines


def _targeted(override: str) -> bool:
    """``LABEL:KEY=VALUE``: a colon before the first ``=`` and the first ``.``."""
    head = override.partition("=")[0]
    return ":" in head and "." not in head.partition(":")[0]


def _one_store(pipelines: list[PipelineSpec]) -> str | None:
    stores = {p.store for p in pipelines}
    if len(stores) > 1:
        raise SpecError(f"the methods name different stores ({', '.join(sorted(map(str, stores)))}); shared stages are "
                        "computed once only in one store: give --store")  # fmt: skip
    return stores.pop()


def _clips(given: list[str], pipelines: list[PipelineSpec], root: str, settings: Settings) -> list[Clip]:
    if not given:
        inputs = list(dict.fromkeys(p.input for p in pipelines if p.input))
        if not inputs:
            raise SpecError("no clips to compare on; give clips (videos, a folder, a glob or a manifest) or set `input:`")
        found = [Clip(normalize_url(url), "") for url in inputs]
    else:
        found = []
    for item in given:
        if item.lower().endswith((".txt", ".json")) or any(c in item for c in "*?[") or _is_dir(item, settings):
            found += list_library(item, settings)
        else:
            found.append(Clip(normalize_url(item), ""))
    urls = [c.url for c in found]
    if len(set(urls)) != len(urls):
        raise SpecError(f"clip {next(u for u in urls if urls.count(u) > 1)!r} is given twice; give each clip once")
    found = [c for c in found if not c.url.startswith(root.rstrip("/") + "/")]  # never the edits of an earlier run
    if not found:
        raise SpecError(f"every clip given lies in the output folder {root!r}; give clips from elsewhere")
    check_unique(found)  # two clips named alike in one folder would write the same outputs
    return found


def _is_dir(url: str, settings: Settings) -> bool:
    fs, path = url_to_fs(url, settings.storage_options)
    return fs.isdir(path)


def _clip_spec(pipeline: PipelineSpec, clip: Clip, *, store: str | None, output: str) -> PipelineSpec:
    """``pipeline`` on ``clip``, taking only the sources of the clip's manifest entry it declares."""
    mine = tuple((name, url) for name, url in clip.sources if name in pipeline.source_kinds)
    return clip_pipeline(pipeline, Clip(clip.url, clip.folder, mine, clip.overrides), store=store, output=output)


# the table -------------------------------------------------------------------------------------


def metric_columns(manifests: list[RunManifest]) -> bool:
    """Whether metric columns are named ``stage.metric`` (some edit has several metrics stages) rather than by
    the metric alone; decided once for the whole table, so one metric is one column across methods."""
    return any(len(m.metrics) > 1 for m in manifests)


def comparison_row(run: PreparedRun, manifest: RunManifest, view: EditView, *, qualified: bool) -> ComparisonRow:
    """One row: the edit's metrics and what it needs to compute, whoever computed it."""
    metrics = {
        (f"{stage}.{name}" if qualified else name): (float(value) if math.isfinite(value) else None)
        for stage, values in manifest.metrics.items()
        for name, value in values.items()
    }
    done = [r for r in manifest.stages if r.status in ("computed", "cached")]
    peaks = [r.peak_memory for r in done if r.peak_memory is not None]
    gpu = [r.peak_gpu_memory for r in done if r.peak_gpu_memory is not None]
    failed = next((r for r in manifest.stages if r.status == "failed"), None)
    size = view.size
    models = {p.node.models[role]: m.id + (f"@{m.revision}" if m.revision else "")
              for p in run.planned for role, m in p.call.models.items()}  # fmt: skip
    return ComparisonRow(
        method=manifest.pipeline,
        clip=manifest.input.url,
        status=manifest.status,
        seed=manifest.spec.seed,
        models=models,
        frames=size[0] if size else None,
        width=size[1] if size else None,
        height=size[2] if size else None,
        fps=str(view.source.fps) if view.source is not None else None,
        metrics=metrics,
        stage_seconds=round(sum(r.compute_seconds or 0.0 for r in done), 4),
        computed_seconds=round(sum(r.compute_seconds or 0.0 for r in done if r.status == "computed"), 4),
        peak_memory=max(peaks, default=None),
        peak_gpu_memory=max(gpu, default=None),
        bytes=sum(r.bytes or 0 for r in done),
        output=next((url for key, url in manifest.outputs.items() if key not in ("manifest", "report")), None),
        report=manifest.outputs.get("report"),
        manifest=manifest.outputs.get("manifest"),
        error=f"{failed.name}: {failed.error}" if failed else None,
    )


def write_comparison(
    name: str, root: str, runs: list[PreparedRun], manifests: list[RunManifest], settings: Settings, *, seconds: float
) -> Comparison:
    """The table as CSV and JSON beside the edits' outputs, a Prefect table artifact, then the HTML report (which,
    being a view, never loses the table when it cannot be made)."""
    views = [read_edit(m, r.store) for r, m in zip(runs, manifests, strict=True)]
    qualified = metric_columns(manifests)
    rows = [comparison_row(r, m, v, qualified=qualified) for r, m, v in zip(runs, manifests, views, strict=True)]
    better: dict[str, str] = {}
    for view in views:
        better.update({(f"{s.stage}.{s.name}" if qualified else s.name): s.better for s in view.series if s.better})
    distinct: dict[str, StageRecord] = {}
    for manifest in manifests:  # the first record of a key is the one that ran it (see execute_runs)
        for record in manifest.stages:
            distinct.setdefault(record.key, record)
    computed = sum(r.compute_seconds or 0.0 for r in distinct.values() if r.status == "computed")
    options = options_for(root, settings.storage_options)
    comparison = Comparison(
        name=name,
        methods=list(dict.fromkeys(m.pipeline for m in manifests)),
        clips=list(dict.fromkeys(m.input.url for m in manifests)),
        store=runs[0].store.url,
        seconds=round(seconds, 4),
        stages_planned=sum(len(r.planned) for r in runs),
        stages_distinct=len(distinct),
        stage_seconds=round(sum(row.stage_seconds for row in rows), 4),
        computed_seconds=round(computed, 4),
        better=better,
        rows=rows,
        outputs={"csv": join_url(root, f"{name}.csv"), "json": join_url(root, f"{name}.json"),
                 "report": join_url(root, f"{name}.html")},  # fmt: skip
    )
    write_bytes(comparison.outputs["csv"], to_csv(comparison).encode(), options, content_type="text/csv")
    write_bytes(comparison.outputs["json"], comparison.model_dump_json(indent=2).encode(), options)
    publish_table(f"comparison-{name}", table_rows(comparison), description=_summary(comparison))
    try:
        for view, row in zip(views, rows, strict=True):
            view.report = _relative(row.report, root) if row.report else None
        title = f"{name}: {' vs '.join(comparison.methods)}"
        page = comparison_report(title, views, _html_table(comparison, root), _summary(comparison))
        write_bytes(comparison.outputs["report"], page.encode(), options, content_type="text/html; charset=utf-8")
    except Exception as exc:  # noqa: BLE001
        logging.getLogger(__name__).warning("no comparison report: %s: %s", type(exc).__name__, exc)
        return comparison.model_copy(update={"outputs": {k: v for k, v in comparison.outputs.items() if k != "report"}})
    publish_link(f"comparison-report-{name}", browser_url(comparison.outputs["report"], settings),
                 f"{name}: comparison report", description="every method's output beside the source, metrics, costs")  # fmt: skip
    return comparison


def _relative(url: str, root: str) -> str:
    """``url`` relative to the folder ``root`` when it is inside it (so the comparison's links survive a copy)."""
    root = root.rstrip("/") + "/"
    return url[len(root):] if url.startswith(root) else url


def _summary(c: Comparison) -> str:
    saved = c.stage_seconds - c.computed_seconds
    return (f"{len(c.methods)} methods on {len(c.clips)} clips in {c.seconds:.1f} s: {c.stages_planned} stages planned, "
            f"{c.stages_distinct} distinct; {c.computed_seconds:.1f} s of stages computed for {c.stage_seconds:.1f} s the "
            f"edits need ({saved:.1f} s shared or reused)")  # fmt: skip


def _metric_names(c: Comparison) -> list[str]:
    return list(dict.fromkeys(name for row in c.rows for name in row.metrics))


def table_rows(c: Comparison) -> list[dict[str, Any]]:
    """One dict per row, one key per column (metrics in the order they first appear)."""
    names = _metric_names(c)
    rows = []
    for row in c.rows:
        record: dict[str, Any] = {"method": row.method, "clip": row.clip, "status": row.status, "seed": row.seed,
                                  "frames": row.frames, "width": row.width, "height": row.height, "fps": row.fps}  # fmt: skip
        record.update({name: row.metrics.get(name) for name in names})
        record.update(stage_seconds=row.stage_seconds, computed_seconds=row.computed_seconds, peak_memory=row.peak_memory,
                      peak_gpu_memory=row.peak_gpu_memory, bytes=row.bytes,
                      models="; ".join(f"{model}={ref}" for model, ref in row.models.items()),
                      output=row.output, report=row.report, error=row.error)  # fmt: skip
        rows.append(record)
    return rows


def to_csv(c: Comparison) -> str:
    rows = table_rows(c)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def _html_table(c: Comparison, root: str) -> str:
    """The table for people: each metric's best value on a clip bold, costs, and a link to each edit's report."""
    names = _metric_names(c)
    header = ["method", "clip", "status", *names, "stage s", "computed s", "peak memory", "bytes", "frames", "seed", "report"]
    named = {url: PurePosixPath(url).name for url in c.clips}
    if len(set(named.values())) < len(named):  # two clips named alike (in different folders): their whole URLs
        named = {url: url for url in c.clips}
    rows = []
    for row in c.rows:
        report = Raw(f'<a href="{link(_relative(row.report, root))}">report</a>') if row.report else ""
        metrics = [row.metrics[n] if row.metrics.get(n) is not None else "" for n in names]
        rows.append([row.method, named[row.clip], row.status, *metrics, row.stage_seconds, row.computed_seconds,
                     human_bytes(row.peak_memory) if row.peak_memory else "", human_bytes(row.bytes),
                     f"{row.frames} at {row.width}x{row.height}" if row.frames else "", row.seed, report])  # fmt: skip
    return html_table(header, rows, {3 + i: c.better[n] for i, n in enumerate(names) if n in c.better}, group=1)
