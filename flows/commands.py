"""What each ``reelflow`` subcommand does. Heavy imports (torch, Prefect) happen inside the handlers
that need them, so ``reelflow inspect`` and ``reelflow gc`` start fast."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import socket
import time
from pathlib import Path, PurePosixPath
from typing import Any

from reelflow.deployments import spec_path
from reelflow.flows.sources import source_overrides
from reelflow.schemas.errors import SpecError
from reelflow.schemas.registry import DECLARED_IN, load_methods, tiny_builders
from reelflow.schemas.stages import STAGE_TYPES, stage_tag
from reelflow.schemas.loading import load_spec
from reelflow.schemas.settings import Settings
from reelflow.storage.files import human_bytes
from reelflow.storage.gc import collect_garbage
from reelflow.storage.store import ArtifactStore, locate_artifact_url

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZES = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use a number and s, m, h, d or w (e.g. 30d)")
    return float(match[1]) * _UNITS[match[2]]


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match[2] not in _SIZES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 500MB, 20GiB or 1TB")
    return int(float(match[1]) * _SIZES[match[2]])


def quiet_tracebacks() -> None:
    """Keep Prefect's failure logs to their one-line message; --debug restores the tracebacks.

    Logger-level filters run before a record reaches any handler, and Prefect's own logging
    set-up (which happens later, when a flow starts) keeps them.
    """

    def strip(record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        logging.getLogger(name).addFilter(strip)


# run / demo ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    for field in ("input", "store", "output"):
        if getattr(args, field):
            overrides.append(f"{field}={json.dumps(getattr(args, field))}")
    path = spec_path(args.spec)
    overrides += source_overrides(load_spec(path, overrides), parse_sources(args.sources))
    spec = load_spec(path, overrides)
    manifest = run_spec(spec)
    print_summary(manifest)
    return 0


def run_spec(spec: Any) -> Any:
    """Check the inputs, then run the edit, its stages' progress drawn live when on a terminal."""
    from reelflow.flows.edit import check_inputs, edit_video_with_settings
    from reelflow.flows.terminal import live_progress

    settings = Settings()
    check_inputs(spec, settings)
    with live_progress():
        return edit_video_with_settings(settings)(spec)


def bulk(args: argparse.Namespace) -> int:
    from reelflow.flows.bulk import BulkReport, bulk_edit
    from reelflow.flows.runners import supervised_here
    from reelflow.flows.terminal import live_progress
    from reelflow.schemas.errors import StageFailed
    from reelflow.storage.files import join_url, normalize_url

    spec = load_spec(spec_path(args.spec), args.overrides)
    try:
        with supervised_here(), live_progress():  # this process runs the bulk run and its edits, so no heartbeats
            report = bulk_edit(
                library=args.library, spec=spec, output=args.output, store=args.store, concurrency=args.concurrency,
                skip_existing=args.skip_existing, dispatch=args.dispatch,
            )  # fmt: skip
    except StageFailed:
        print_written(join_url(normalize_url(args.output or spec.output), f"{spec.name}.bulk.json"), BulkReport, print_bulk)
        raise
    print_bulk(report)
    return 0


def print_written(url: str, model: Any, show: Any) -> None:
    """Show the report a failed bulk edit or comparison still wrote at ``url`` (a JSON ``model``), if it did."""
    from reelflow.storage.files import url_to_fs

    fs, path = url_to_fs(url, Settings().storage_options)
    if fs.isfile(path):
        show(model.model_validate_json(fs.cat_file(path)))


def print_bulk(report: Any) -> None:
    for clip in report.clips:
        print(f"  {clip.status:<9} {clip.seconds:>7.1f}s  {clip.clip}  {clip.error or clip.output or ''}")
    print(f"{report.count('completed')} edited, {report.count('exists')} already done, {report.count('failed')} failed; "
          f"report {report.output}/{report.pipeline}.bulk.json")  # fmt: skip


def serve_pictures(args: argparse.Namespace) -> int:
    from reelflow.flows.pictures import serve_pictures as serve

    settings = Settings()
    store = ArtifactStore(args.store or settings.store, settings.storage_options)
    with serve(store, args.host, args.port) as url:
        if args.host in ("0.0.0.0", "::"):  # reachable from other machines: name this one, not the wildcard
            url = url.replace(args.host, socket.getfqdn(), 1)
        print(f"serving {store.url}/pictures at {url}; set REELFLOW_PICTURES_URL={url} for the runs (Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


def compare(args: argparse.Namespace) -> int:
    from reelflow.flows.compare import compare_methods, resolve_methods
    from reelflow.flows.runners import task_runner
    from reelflow.flows.terminal import live_progress
    from reelflow.schemas.errors import StageFailed
    from reelflow.schemas.manifest import COMPARISON_NAME

    methods, specs = list(args.methods), []
    if args.demo:
        from reelflow.flows.demo import prepare_demo

        workdir = Path(args.workdir).resolve()
        for item in methods:
            label, sep, preset = item.partition("=")
            spec = prepare_demo(workdir, preset if sep else item)
            specs.append(load_spec(spec.model_dump(mode="json"), [f"name={label}"]) if sep else spec)
        methods = []
    if not re.fullmatch(COMPARISON_NAME, args.name):
        raise SpecError(f"--name {args.name!r} must be lowercase letters, digits, - and _ (it names the table's files)")
    pipelines = resolve_methods(methods, specs, args.overrides)  # a bad method or override stops here, before a run starts
    compare = compare_methods.with_options(task_runner=task_runner(Settings()))  # REELFLOW_TASK_RUNNER, _MAX_CONCURRENCY
    try:
        with live_progress():
            comparison = compare(methods=methods, specs=specs, clips=args.clips, overrides=args.overrides,
                                 store=args.store, output=args.output, name=args.name)  # fmt: skip
    except StageFailed:
        from reelflow.schemas.manifest import Comparison
        from reelflow.storage.files import join_url, normalize_url

        print_written(join_url(normalize_url(args.output or pipelines[0].output), f"{args.name}.json"), Comparison,
                      print_comparison)  # fmt: skip
        raise
    print_comparison(comparison)
    return 0


def print_comparison(comparison: Any) -> None:
    names = list(dict.fromkeys(name for row in comparison.rows for name in row.metrics))
    width = max(len("method"), *(len(row.method) for row in comparison.rows))
    print(f"\n{'method':<{width}}  {'clip':<16} {'stage s':>8} {'computed':>8}  " + "  ".join(names))
    for row in comparison.rows:
        values = "  ".join(f"{row.metrics[n]:>{len(n)}.4g}" if row.metrics.get(n) is not None else f"{'-':>{len(n)}}"
                           for n in names)  # fmt: skip
        clip = PurePosixPath(row.clip).name
        print(f"{row.method:<{width}}  {clip[:16]:<16} {row.stage_seconds:>8.2f} {row.computed_seconds:>8.2f}  {values}")
    saved = comparison.stage_seconds - comparison.computed_seconds
    print(f"\n{comparison.stages_planned} stages planned, {comparison.stages_distinct} distinct: {comparison.computed_seconds:.2f} s "
          f"computed for {comparison.stage_seconds:.2f} s the edits need ({saved:.2f} s shared or reused)")  # fmt: skip
    for name, url in comparison.outputs.items():
        print(f"  {name:<7} {url}")


def demo(args: argparse.Namespace) -> int:
    from reelflow.flows.demo import prepare_demo

    workdir = Path(args.workdir).resolve()
    spec = prepare_demo(workdir, args.preset)
    manifest = run_spec(spec)
    print_summary(manifest)
    models = ", ".join(sorted({model.id for model in spec.models.values()})) or "none"
    print(f"\nsource clip  {spec.input}\nmodels       {models}\nstore        {spec.store}")
    print(f"try          reelflow list --store {spec.store}")
    return 0


def print_summary(manifest: Any) -> None:
    print(f"\n{manifest.pipeline}: {manifest.status} in {manifest.seconds:.1f}s (run {manifest.run_id})")
    for r in manifest.stages:
        print(f"  {r.name:<18} {r.status:<9} {r.seconds:>7.2f}s  {r.key[:12]}")
    for stage_id, values in manifest.metrics.items():
        print(f"  metrics[{stage_id}]: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
    for name, url in manifest.outputs.items():
        print(f"  {name:<18} {url}")


# inspect / gc --------------------------------------------------------------------------------


def _store(url: str | None) -> ArtifactStore:
    """An existing store (``url`` or REELFLOW_STORE): these commands read or prune one, never create it."""
    settings = Settings()
    store = ArtifactStore(url or settings.store, settings.storage_options)
    store.ensure_exists()
    return store


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def inspect(args: argparse.Namespace) -> int:
    if "/" in args.target:
        root, stage, key = locate_artifact_url(args.target)
        store, rel = _store(root), ArtifactStore.artifact_path(stage, key)
    else:
        store = _store(args.store)
        rel = store.find(args.target).path
    print(describe_artifact(store, rel))
    return 0


def describe_artifact(store: ArtifactStore, rel: str) -> str:
    attrs = store.read_attrs(rel)
    prov = attrs.get("provenance", {})
    lines = [
        f"artifact   {store.url_of(rel)}",
        f"stage      {prov.get('stage')} (id {prov.get('stage_id')}, version {prov.get('version')}) "
        f"of pipeline {prov.get('pipeline')}",
        f"key        {prov.get('key')}",
        f"status     {_status(attrs)}",
        f"size       {human_bytes(store.size(rel))} stored",
    ]
    if attrs.get("complete"):
        lines.append("arrays")
        for name, array in sorted(store.open_path(rel).arrays()):
            dims = ",".join(array.metadata.dimension_names or ())
            lines.append(f"  {name:<12} {str(array.shape):<20} {str(array.dtype):<8} dims ({dims}) chunks {array.chunks}")
    lines.append("inputs")
    for slot, ref in prov.get("inputs", {}).items():
        lines.append(f"  {slot:<12} {ref.get('stage', 'file')} {ref['key'][:16]}  {ref.get('url', '')}")
    lines.append(f"params     {json.dumps(prov.get('params', {}), sort_keys=True)}")
    for role, model in prov.get("models", {}).items():
        lines.append(f"model      {role}: {model['id']} ({model['dtype']}, {model['fingerprint']})")
    lines.append(f"run        {prov.get('run_id')} on {prov.get('host')} ({prov.get('device')})")
    lines.append("libraries  " + ", ".join(f"{k} {v}" for k, v in prov.get("libraries", {}).items()))
    extra = {k: v for k, v in attrs.items() if k not in ("provenance", "complete", "started_at", "completed_at", "seconds")}
    for name, value in extra.items():
        lines.append(f"{name:<10} {json.dumps(value, sort_keys=True)}")
    return "\n".join(lines)


def _status(attrs: dict[str, Any]) -> str:
    if not attrs.get("complete"):
        started = dt.datetime.fromtimestamp(attrs.get("started_at", 0)).isoformat(timespec="seconds")
        return f"INCOMPLETE (started {started}; never finished, readers refuse it)"
    done = dt.datetime.fromtimestamp(attrs["completed_at"]).isoformat(timespec="seconds")
    return f"complete at {done}, computed in {attrs.get('seconds', 0):.2f}s"


def list_artifacts(args: argparse.Namespace) -> int:
    store = _store(args.store)
    count = 0
    for info in store.list(args.stage):
        when = dt.datetime.fromtimestamp(info.created_at).isoformat(sep=" ", timespec="seconds")
        state = "complete" if info.complete else "INCOMPLETE"
        print(f"{when}  {info.stage:<16} {info.key[:16]}  {state:<10} {human_bytes(store.size(info.path)):>10}")
        count += 1
    print(f"{_plural(count, 'artifact')} in {store.url}")
    return 0


def gc(args: argparse.Namespace) -> int:
    store = _store(args.store)
    report = collect_garbage(
        store, older_than=args.older_than, max_bytes=args.max_size, stale_after=args.stale_after, dry_run=args.dry_run
    )
    verb = "would remove" if report.dry_run else "removed"
    for rel in report.removed:
        print(f"{verb} {store.url_of(rel)}")
    print(
        f"{verb} {_plural(len(report.removed), 'entry', 'entries')}, {human_bytes(report.freed_bytes)}; kept "
        f"{len(report.kept_held)} held by running edits; {human_bytes(report.remaining_bytes)} of artifacts remain"
    )
    return 0


def models_tiny(args: argparse.Namespace) -> int:
    builders = tiny_builders()
    if args.kind not in builders:
        raise SpecError(f"no tiny model {args.kind!r}; installed: {', '.join(sorted(builders))}")
    path = builders[args.kind].tiny_builder(args.kind)(Path(args.dir), seed=args.seed)
    print(f"wrote the tiny random model {args.kind!r} ({builders[args.kind].name}) to {path}")
    return 0


def parse_sources(given: list[str]) -> dict[str, str]:
    """``--source NAME=PATH`` values by name."""
    sources = {}
    for item in given:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SpecError(f"--source {item!r} is not of the form NAME=PATH, e.g. edited_frame=frame0.png")
        if name in sources:
            raise SpecError(f"--source {name} is given twice ({sources[name]}, {path}); give each source once")
        sources[name] = path
    return sources


def stages(args: argparse.Namespace) -> int:
    """Every declared stage, by (stage, method), with what the engine reads from its declaration."""
    if args.tiny:
        for name, method in sorted(tiny_builders().items()):
            print(f"{name:<20} {method.name:<10} {method.tiny[name]}")
        return 0
    load_methods()
    if args.metrics:
        from reelflow.schemas.metrics import METRICS

        for spec in METRICS.values():
            needs = ", ".join(sorted(spec.needs)) or "frames only"
            print(f"{spec.name:<30} per {spec.per:<5} {spec.better} is better; needs {needs}\n    {spec.description}")
        return 0
    for (stage, method), cls in sorted(STAGE_TYPES.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        package = DECLARED_IN.get(cls.__module__, cls.__module__)
        print(f"{stage_tag(stage, method):<28} -> {cls.produces:<26} version {cls.version}  package {package}")
        for slot, kinds in cls.slots.items():
            print(f"    input  {slot} <- {'|'.join(kinds)}" + (" (optional)" if slot in cls.optional_slots else ""))
        for slot, kind in cls.reads.items():
            print(f"    source {slot}: {kind}")
        for slot, kind in cls.optional_reads.items():
            print(f"    source {slot}: {kind} (optional)")
        for role, declared in cls.roles.items():
            optional = " (optional)" if role in cls.optional_roles else ""
            print(f"    model  {role}: {'|'.join(declared.families)}  {declared.description}{optional}")
        for export in cls.exports:
            print(f"    export {export.kind}" + (f" .{export.suffix}" if export.suffix else ""))
    return 0
