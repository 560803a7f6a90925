"""The ``reelflow`` command line: run, bulk, compare, demo, inspect, list, gc, serve-pictures, models tiny.

Errors a user can cause end in one line on stderr and a non-zero exit; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from collections.abc import Callable, Sequence

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from reelflow.flows import commands  # noqa: E402  (after the Prefect environment defaults)
from reelflow.flows.demo import DEMO_DESCRIPTION  # noqa: E402
from reelflow.schemas.errors import ReelflowError  # noqa: E402


_DEBUG_HELP = "show tracebacks and Prefect's own error logs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reelflow", description="Declarative, cached diffusion video editing.")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    # --debug after the subcommand too; SUPPRESS keeps a subcommand from resetting a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(sub.add_parser, parents=[common])

    run = add("run", help="run a pipeline spec (or a preset name) on a video")
    run.add_argument("spec", help="pipeline YAML file, or a preset name such as 'reconstruct'")
    run.add_argument("--input", help="source video path or URL (overrides the spec's `input`)")
    run.add_argument("--store", help="artifact store URL (overrides the spec and REELFLOW_STORE)")
    run.add_argument("--output", help="directory for the output video and run manifest")
    run.add_argument("--source", dest="sources", action="append", default=[], metavar="NAME=PATH",
                     help="a file for one of the pipeline's named sources, e.g. edited_frame=frame0.png (repeatable)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec field, e.g. stages.encode_video.params.crf=23 (repeatable)")
    run.set_defaults(handler=commands.run)

    bulk = add("bulk", help="run a pipeline on every clip of a media library (glob, folder or manifest)")
    bulk.add_argument("library", help="fsspec glob ('clips/**/*.mp4', 's3://bucket/in/*.mp4'), folder, or .txt/.json manifest")
    bulk.add_argument("spec", help="pipeline YAML file, or a preset name such as 'reconstruct'")
    bulk.add_argument("--output", help="where the outputs go, mirroring the library's folders")
    bulk.add_argument("--store", help="artifact store URL (overrides the spec and REELFLOW_STORE)")
    bulk.add_argument("--concurrency", type=int, default=2, help="edits at once (default 2)")
    bulk.add_argument("--dispatch", metavar="DEPLOYMENT", help="run each clip as a run of this edit-video deployment")
    bulk.add_argument("--no-skip", dest="skip_existing", action="store_false", help="rerun clips already edited")
    bulk.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a spec field (repeatable)")
    bulk.set_defaults(handler=commands.bulk)

    compare = add("compare", help="run several presets or specs on the same clips; one table of metrics and costs",
                  description="Run every method on every clip, computing the stages they share (decode, VAE, depth, "
                  "flow) once, and write <name>.csv, .json and .html (one row per method and clip) under --output, "
                  "beside each edit's video, manifest and report. Set REELFLOW_MAX_CONCURRENCY=1 for per-stage "
                  "seconds and memory to compare methods by.")  # fmt: skip
    compare.add_argument("methods", nargs="+", metavar="METHOD",
                         help="preset name or spec file, optionally labelled: LABEL=PRESET (e.g. strong=fatezero-style)")
    compare.add_argument("--clip", dest="clips", action="append", default=[], metavar="CLIP",
                         help="a video, folder, glob or library manifest (repeatable; default: the specs' input)")
    compare.add_argument("--store", help="artifact store URL (overrides the specs and REELFLOW_STORE)")
    compare.add_argument("--output", help="where the edits and the table go (default: the first spec's output)")
    compare.add_argument("--name", default="comparison",
                         help="names the table's files <name>.csv, .json, .html: lowercase letters, digits, - and _ "
                              "(default: comparison)")  # fmt: skip
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="[LABEL:]KEY=VALUE",
                         help="override a spec field of every method, or of the one labelled LABEL (repeatable)")
    compare.add_argument("--demo", action="store_true",
                         help="wire every method to the demo's synthetic clip and tiny models (see `reelflow demo`)")
    compare.add_argument("--workdir", default="demo", help="with --demo: where the clip, models and store go (default: demo)")
    compare.set_defaults(handler=commands.compare)

    demo = add("demo", help="run a preset on a synthetic clip with a tiny model", description=DEMO_DESCRIPTION)
    demo.add_argument("--workdir", default="demo", help="where the clip, models, store and outputs go (default: demo)")
    demo.add_argument("--preset", default="reconstruct", help="preset to run, e.g. fatezero-local (default: reconstruct)")
    demo.set_defaults(handler=commands.demo)

    inspect = add("inspect", help="show what an artifact holds and where it came from")
    inspect.add_argument("target", help="a stage key (or a unique prefix of 6+ hex digits) or an artifact URL")
    inspect.add_argument("--store", help="store URL to search for a key (default: REELFLOW_STORE)")
    inspect.set_defaults(handler=commands.inspect)

    listing = add("list", help="list the artifacts in a store, oldest first")
    listing.add_argument("--store", help="store URL (default: REELFLOW_STORE)")
    listing.add_argument("--stage", help="only this stage type, e.g. encode_latents")
    listing.set_defaults(handler=commands.list_artifacts)

    gc = add("gc", help="delete old artifacts and crashed writes, keep the store under a budget")
    gc.add_argument("--store", help="store URL (default: REELFLOW_STORE)")
    gc.add_argument("--older-than", type=commands.parse_duration, metavar="AGE", help="e.g. 30d, 12h, 45m")
    gc.add_argument("--max-size", type=commands.parse_size, metavar="SIZE", help="e.g. 200GB, 512MiB")
    gc.add_argument("--stale-after", type=commands.parse_duration, default=commands.parse_duration("6h"),
                    metavar="AGE", help="age after which unfinished writes are swept (default 6h)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    gc.set_defaults(handler=commands.gc)

    serve = add("serve-pictures", help="serve a local store's pictures to the Prefect UI over HTTP")
    serve.add_argument("--store", help="store path (default: REELFLOW_STORE)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; 0.0.0.0 to serve browsers on other machines)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    serve.set_defaults(handler=commands.serve_pictures)

    models = add("models", help="model utilities")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    tiny = models_sub.add_parser(
        "tiny", parents=[common], help="write a tiny random model (by default a Stable-Diffusion-style bundle) for tests"
    )
    tiny.add_argument("dir", help="target directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--kind", default="sd", help="which tiny model: sd (default), or one a method package ships "
                                                   "(see `reelflow stages --tiny`)")  # fmt: skip
    tiny.set_defaults(handler=commands.models_tiny)

    stages = add("stages", help="list every stage and method: slots, output kind, model roles, sources, version")
    stages.add_argument("--tiny", action="store_true", help="list the tiny models method packages ship instead")
    stages.add_argument("--metrics", action="store_true", help="list the metrics compute_metrics knows, with their needs")
    stages.set_defaults(handler=commands.stages)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
    except BrokenPipeError:
        return stdout_closed()


def stdout_closed() -> int:
    """The reader of stdout went away (``reelflow list | head``): stop quietly.

    Python docs, signal module, "Note on SIGPIPE": point stdout at devnull so the interpreter's
    own flush at exit does not fail again, and exit 1.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        commands.quiet_tracebacks()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("reelflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except Exception as exc:  # noqa: BLE001  (the one place that turns any failure into an exit code)
        if args.debug:
            traceback.print_exc()
        kind = "" if isinstance(exc, ReelflowError) else f"unexpected {type(exc).__name__}: "
        print(f"reelflow: error: {kind}{exc}".replace("\n", " "), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
