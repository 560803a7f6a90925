"""Self-contained HTML reports: one per edit, one per comparison of methods.

A report is one file a person opens in a browser on any machine: every picture is a data URL, the
source and the output play as VP9 WebM data URLs (the codec every Chromium and Firefox build decodes;
Safari's support varies),
plots are inline SVG, and nothing is fetched. It is read from the run manifest and the store alone, so
it names no stage or method: the source frames are the ``video_frames`` artifact the pipeline decodes
from its video, the output frames the ``frames`` artifact its exported video encodes, the pictures the
PNGs each stage saved beside its artifact, and the metrics the arrays of each stage that exports them.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import PurePosixPath
from typing import TypeVar
from urllib.parse import quote

import numpy as np
from PIL import Image

from reelflow.core.video import encode_webm
from reelflow.schemas.graph import Node
from reelflow.schemas.kinds import Metrics, VideoFrames
from reelflow.schemas.manifest import RunManifest, StageRecord
from reelflow.schemas.pipeline import VIDEO
from reelflow.storage.files import human_bytes
from reelflow.storage.store import PICTURES, ArtifactStore

STRIP_FRAMES = 8  # frames shown side by side as stills
_SOURCE_KIND, _FRAMES_KIND = "video_frames", "frames"
REPORT_SIDE = 512  # a report's videos and stills are scaled down (by a whole factor) to at most this many pixels a side
_log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Clip:
    """Frames of a clip as the pipeline saw them: uint8 ``(F, H, W, 3)``, source frame numbers, times, rate."""

    frames: np.ndarray
    numbers: np.ndarray
    times: np.ndarray
    fps: Fraction


@dataclass(frozen=True)
class Series:
    """One metric of one stage: a value per frame (or per neighbouring pair, placed at its first frame)."""

    stage: str
    name: str
    per: str
    values: np.ndarray
    mean: float
    better: str | None = None
    description: str = ""


@dataclass(frozen=True)
class Picture:
    stage: str
    name: str
    png: bytes


@dataclass
class EditView:
    """What a report shows of one edit, read from its manifest and the store."""

    manifest: RunManifest
    label: str
    source: Clip | None = None
    output: Clip | None = None
    pictures: list[Picture] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    report: str | None = None  # where the edit's own report is, for a comparison to link to

    @property
    def clip(self) -> str:
        return PurePosixPath(self.manifest.input.url).name

    @property
    def size(self) -> tuple[int, int, int] | None:
        """(frames, width, height) of the source frames the pipeline worked on."""
        if self.source is None:
            return None
        count, height, width = self.source.frames.shape[:3]
        return count, width, height


def read_edit(manifest: RunManifest, store: ArtifactStore, label: str | None = None) -> EditView:
    """The edit's frames, pictures and metrics from ``store``; what cannot be read (a failed stage, an artifact
    collected since) is left out with a warning, never an error: a report of a failed edit still shows what ran."""
    view = EditView(manifest=manifest, label=label or manifest.pipeline)
    view.source, view.output, _ = read_clips(manifest, store)
    done = {r.name: r for r in manifest.stages if r.status in ("computed", "cached")}
    nodes = {node.id: node for node in manifest.spec.graph.order()}
    for node in nodes.values():
        record = done.get(node.id)
        if record is None:
            continue
        view.pictures += [Picture(node.id, name, png) for name, png in _best_effort(
            f"the pictures of {node.id}", _pictures, store, record) or ()]  # fmt: skip
        if any(e.kind == "metrics" for e in node.spec.exports):
            view.series += _best_effort(f"the metrics of {node.id}", _series, store, record) or []
    return view


def read_clips(
    manifest: RunManifest, store: ArtifactStore, limit: int | None = None
) -> tuple[Clip | None, Clip | None, StageRecord | None]:
    """The source frames the pipeline decoded, the output frames it exported, and the output's stage record (None for
    what the run did not make or the store no longer holds); at most ``limit`` frames of each, evenly spaced."""
    done = {r.name: r for r in manifest.stages if r.status in ("computed", "cached")}
    nodes = {node.id: node for node in manifest.spec.graph.order()}
    source_id = next((n.id for n in nodes.values() if n.spec.produces == _SOURCE_KIND and VIDEO in n.sources.values()), None)
    source = _best_effort(f"the frames of {source_id}", _read_clip, store, done[source_id], None, limit) if source_id in done else None
    output_id = _output_stage(nodes)
    if output_id not in done or source is None:
        return source, None, None
    output = _best_effort(f"the frames of {output_id}", _read_clip, store, done[output_id], source, limit)
    return source, output, done[output_id]


def _best_effort(what: str, read: Callable[..., T], *args: object) -> T | None:
    try:
        return read(*args)
    except Exception as exc:  # noqa: BLE001  (a report shows what it can)
        _log.warning("report: cannot read %s (%s: %s)", what, type(exc).__name__, exc)
        return None


def _output_stage(nodes: dict[str, Node]) -> str | None:
    """The frames the pipeline's exported video encodes (else its last frames artifact)."""
    exported = [n for n in nodes.values() if any(e.kind == "file" for e in n.spec.exports)]
    for node in exported:
        for producer in node.inputs.values():
            if nodes[producer].spec.produces == _FRAMES_KIND:
                return producer
    made = [n.id for n in nodes.values() if n.spec.produces == _FRAMES_KIND]
    return made[-1] if made else None


def _read_clip(store: ArtifactStore, record: StageRecord, source: Clip | None, limit: int | None = None) -> Clip:
    group = store.open(record.stage, record.key)
    count = group["frames"].shape[0]
    shown = np.arange(count) if limit is None or count <= limit else np.unique(np.linspace(0, count - 1, limit).round().astype(int))
    frames = np.asarray(group["frames"].oindex[shown])
    rate_scale = count / len(shown)  # a thinned clip plays over the same duration
    if source is not None:  # made frames share the source's numbers and rate
        if len(frames) != len(source.frames):
            return Clip(frames, shown, shown / float(source.fps), source.fps)
        return Clip(frames, source.numbers, source.times, source.fps)
    attrs = VideoFrames.read(group.attrs)
    numbers = np.asarray(group["frame_index"][:])[shown] if "frame_index" in group else shown
    fps = Fraction(attrs.fps) / Fraction(rate_scale).limit_denominator(1000)
    return Clip(frames, numbers, numbers / float(Fraction(attrs.source_video.fps)), fps)


def _pictures(store: ArtifactStore, record: StageRecord) -> list[tuple[str, bytes]]:
    folder = store.abspath(f"{PICTURES}/{record.stage}/{record.key}")
    paths = sorted(path for suffix in ("png", "jpeg") for path in store.fs.glob(f"{folder}/*.{suffix}"))  # not the preview
    return [(PurePosixPath(path).stem, store.fs.cat_file(path)) for path in paths]


def _series(store: ArtifactStore, record: StageRecord) -> list[Series]:
    group = store.open(record.stage, record.key)
    attrs = Metrics.read(group.attrs)
    series = []
    for name, mean in attrs.metrics.items():
        if name not in group:
            continue
        array = group[name]
        per = (array.metadata.dimension_names or ("frame",))[0]
        series.append(Series(record.name, name, per, np.asarray(array[:], np.float64), float(mean),
                             attrs.better.get(name), attrs.descriptions.get(name, "")))  # fmt: skip
    return series


# HTML ------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1200px;padding:0 16px;color:#1d2330}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e8;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 6px}.sub{color:#5b6472}code{font-size:12px;background:#f3f4f7;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;margin:6px 0}th,td{border:1px solid #dde1e8;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f4f7;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.videos{display:flex;gap:16px;flex-wrap:wrap}.videos figure{margin:0}figcaption{font-size:12px;color:#5b6472}
video,img.frame{image-rendering:pixelated;background:#000;display:block}img.picture{max-width:100%;display:block;image-rendering:pixelated;border:1px solid #dde1e8}
.strip{display:grid;gap:4px;align-items:start}.strip div{font-size:11px;color:#5b6472}
.bar{background:#c2452d;height:10px;display:inline-block;vertical-align:middle}
.status-computed{color:#1f7a3a}.status-cached{color:#2d5fa8}.status-failed,.status-skipped{color:#b3261e}
.best{font-weight:700}svg{display:block}
"""


def edit_report(view: EditView) -> str:
    """The HTML report of one edit."""
    m = view.manifest
    title = f"{m.pipeline} on {view.clip}"
    parts = [
        f"<h1>{_e(title)}</h1>",
        f"<div class=sub>{_e(m.status)} in {m.seconds:.1f} s; run <code>{_e(m.run_id)}</code>; seed {m.spec.seed}; "
        f"store <code>{_e(m.store)}</code></div>",
        _facts([view]),
        "<h2>Source and output</h2>",
        _videos([("source", view.source), (f"output ({m.pipeline})", view.output)], view.label),
        _strip([("source", view.source), ("output", view.output)]),
    ]
    if view.pictures:
        parts.append("<h2>What the stages saw and made</h2>")
        for picture in view.pictures:
            parts += [f"<h3>{_e(picture.stage)}: {_e(picture.name)}</h3>",
                      f'<img class=picture alt="{_e(picture.stage)} {_e(picture.name)}" src="{_image_url(picture.png)}">']  # fmt: skip
    if view.series:
        parts += ["<h2>Metrics</h2>", _metric_table(view.series), *(_plot(s) for s in view.series)]
    parts += ["<h2>Stages: time, memory, bytes, cache</h2>", _stage_table(m), _cost(m)]
    return _page(title, parts)


def comparison_report(title: str, views: Sequence[EditView], table: str, summary: str) -> str:
    """The HTML report of a comparison: the table, then per clip every method's output beside the source, the
    metrics across methods, and links to each edit's own report."""
    parts = [f"<h1>{_e(title)}</h1>", f"<div class=sub>{_e(summary)}</div>", "<h2>Table</h2>", table]
    for clip, group in _by_clip(views):
        parts += [f"<h2>{_e(clip)}</h2>", _facts(group)]
        source = next((v.source for v in group if v.source is not None), None)
        parts.append(_videos([("source", source), *((v.label, v.output) for v in group)], clip))
        parts.append(_strip([("source", source), *((v.label, v.output) for v in group)]))
        names = list(dict.fromkeys(f"{s.stage}.{s.name}" for v in group for s in v.series))
        for name in names:
            found = [(v.label, s) for v in group for s in v.series if f"{s.stage}.{s.name}" == name]
            parts.append(_plot_many(name, found))
        links = [f'<li><a href="{link(v.report)}">{_e(v.label)}</a></li>' for v in group if v.report]
        if links:
            parts += ["<h3>Each edit's report</h3>", "<ul>", *links, "</ul>"]
    return _page(title, parts)


def html_table(
    header: Sequence[str], rows: Iterable[Sequence[object]], best: dict[int, str] | None = None, group: int | None = None
) -> str:
    """A table; numbers right-aligned; in each column of ``best`` (index -> higher|lower) the best value bold, among
    the rows with the same value in column ``group`` (a clip: methods are compared on the same clip only)."""
    rows = [list(row) for row in rows]
    marks: dict[tuple[object, int], float] = {}
    for col, way in (best or {}).items():
        for key in dict.fromkeys(row[group] if group is not None else None for row in rows):
            values = [row[col] for row in rows if (group is None or row[group] == key) and _finite(row[col])]
            if len(values) > 1:
                marks[key, col] = max(values) if way == "higher" else min(values)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        key = row[group] if group is not None else None
        cells = []
        for col, value in enumerate(row):
            if isinstance(value, float):
                css = "n best" if marks.get((key, col)) == value else "n"
                cells.append(f"<td class='{css}'>{value:.4g}</td>")
            elif isinstance(value, int):
                cells.append(f"<td class=n>{value}</td>")
            else:
                cells.append(f"<td>{value if isinstance(value, Raw) else _e(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def link(url: str) -> str:
    """``url`` (a path, relative or not) as an escaped ``href`` value."""
    return _e(quote(url, safe="/:"))


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))


class Raw(str):
    """Cell content that is already HTML."""


def _page(title: str, parts: Sequence[str]) -> str:
    body = "\n".join(parts)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<meta name=generator content=reelflow><style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")  # fmt: skip


def _facts(views: Sequence[EditView]) -> str:
    """Per edit: its clip, the frames it worked on and its models."""
    rows = []
    for view in views:
        m = view.manifest
        models = ", ".join(f"{name}: {model.id}" + (f"@{model.revision}" if model.revision else "")
                           for name, model in m.spec.models.items()) or "none"  # fmt: skip
        size = view.size
        shape = f"{size[0]} frames at {size[1]}x{size[2]}, {float(view.source.fps):.3g} fps" if size else "no frames"
        rows.append((view.label, m.input.url, shape, f"seed {m.spec.seed}", models))
    return html_table(("method", "clip", "frames", "seed", "models"), rows)


def _videos(clips: Sequence[tuple[str, Clip | None]], what: str) -> str:
    figures = []
    for label, clip in clips:
        if clip is None:
            figures.append(f"<figure><figcaption>{_e(label)}: not available</figcaption></figure>")
            continue
        try:
            data = base64.b64encode(encode_webm(scaled_down(clip.frames, REPORT_SIDE), clip.fps)).decode()
        except Exception as exc:  # noqa: BLE001
            _log.warning("report: cannot encode the %s preview of %s (%s)", label, what, exc)
            figures.append(f"<figure><figcaption>{_e(label)}: no preview ({_e(str(exc))})</figcaption></figure>")
            continue
        height, width = scaled_down(clip.frames[:1], REPORT_SIDE).shape[1:3]
        scale = max(1, 256 // max(height, width))
        figures.append(
            f'<figure><video src="data:video/webm;base64,{data}" width={width * scale} height={height * scale} '
            f'autoplay muted loop playsinline controls title="{_e(label)}"></video>'
            f"<figcaption>{_e(label)}: {len(clip.frames)} frames at {width}x{height}</figcaption></figure>"
        )
    return f"<div class=videos>{''.join(figures)}</div>"


def _strip(clips: Sequence[tuple[str, Clip | None]]) -> str:
    """Up to STRIP_FRAMES stills per clip, one row each, labelled with the source frame number and time."""
    present = [(label, clip) for label, clip in clips if clip is not None]
    if not present:
        return ""
    count = len(present[0][1].frames)
    shown = np.unique(np.linspace(0, count - 1, min(STRIP_FRAMES, count)).round().astype(int))
    cells = ["<div></div>"]
    reference = present[0][1]
    cells += [f"<div>frame {reference.numbers[i]} ({reference.times[i]:.2f} s)</div>" for i in shown]
    for label, clip in present:
        cells.append(f"<div>{_e(label)}</div>")
        for i in shown:
            if i < len(clip.frames):
                frame = scaled_down(clip.frames[i : i + 1], REPORT_SIDE)[0]
                scale = max(1, 128 // max(frame.shape[:2]))
                cells.append(f'<img class=frame alt="{_e(label)} frame {clip.numbers[i]}" width={frame.shape[1] * scale} '
                             f'height={frame.shape[0] * scale} src="{_jpeg_url(frame)}">')  # fmt: skip
            else:
                cells.append("<div></div>")
    return f"<div class=strip style='grid-template-columns:auto repeat({len(shown)},auto)'>{''.join(cells)}</div>"


def _metric_table(series: Sequence[Series]) -> str:
    rows = [(s.stage, s.name, s.mean, s.better or "", f"per {s.per}", s.description) for s in series]
    return html_table(("stage", "metric", "mean", "better", "values", "what it measures"), rows)


def _plot(series: Series) -> str:
    return _plot_many(f"{series.stage}.{series.name}", [("", series)])


_COLOURS = ("#c2452d", "#2d5fa8", "#1f7a3a", "#8a4fb3", "#b37a12", "#2a8a8a", "#6b6b6b", "#b3267a")


def _plot_many(name: str, lines: Sequence[tuple[str, Series]], width: int = 560, height: int = 150) -> str:
    """An inline SVG line plot of one metric per frame, one line per labelled series, its mean dashed."""
    values = np.concatenate([s.values[np.isfinite(s.values)] for _, s in lines] or [np.zeros(0)])
    if not values.size:
        return f"<h3>{_e(name)}</h3><p class='sub'>no finite values</p>"
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    count = max(len(s.values) for _, s in lines)
    left, right, top, bottom = 56, 8, 8, 22

    def x(i: float) -> str:
        return f"{left + (width - left - right) * (i / max(1, count - 1)):.1f}"

    def y(v: float) -> str:
        return f"{top + (height - top - bottom) * (1 - (v - low) / (high - low)):.1f}"

    per = lines[0][1].per
    shapes = [_svg("line", x1=left, y1=top, x2=left, y2=height - bottom, stroke="#999"),
              _svg("line", x1=left, y1=height - bottom, x2=width - right, y2=height - bottom, stroke="#999"),
              _svg("text", f"{high:.4g}", x=left - 4, y=top + 10, text_anchor="end", font_size=10),
              _svg("text", f"{low:.4g}", x=left - 4, y=height - bottom, text_anchor="end", font_size=10),
              _svg("text", "0", x=left, y=height - 6, font_size=10),
              _svg("text", f"{per} {count - 1}", x=width - right, y=height - 6, text_anchor="end", font_size=10)]  # fmt: skip
    legend = []
    for index, (label, series) in enumerate(lines):
        colour = _COLOURS[index % len(_COLOURS)]
        finite = [(i, v) for i, v in enumerate(series.values) if np.isfinite(v)]
        shapes.append(_svg("polyline", fill="none", stroke=colour, stroke_width=1.5,
                           points=" ".join(f"{x(i)},{y(v)}" for i, v in finite)))  # fmt: skip
        shapes += [_svg("circle", cx=x(i), cy=y(v), r=2, fill=colour) for i, v in finite]
        if np.isfinite(series.mean):
            shapes.append(_svg("line", x1=left, x2=width - right, y1=y(series.mean), y2=y(series.mean), stroke=colour,
                               stroke_dasharray="4 3", stroke_width=1))  # fmt: skip
        legend.append(f"<span style='color:{colour}'>{_e(label or series.name)}</span> mean {series.mean:.4g}")
    better = lines[0][1].better
    caption = " · ".join(legend) + (f" ({better} is better)" if better else "")
    svg = _svg("svg", "".join(shapes), width=width, height=height, role="img", aria_label=f"{name} per {per}")
    return f"<h3>{_e(name)}</h3>{svg}<div class='sub'>{caption}</div>"


def _svg(tag: str, content: str | None = None, **attributes: object) -> str:
    """An SVG element, every attribute quoted (``font_size`` is written ``font-size``); text content escaped
    unless it is markup made here."""
    attrs = " ".join(f'{k.replace("_", "-")}="{_e(v)}"' for k, v in attributes.items())
    if content is None:
        return f"<{tag} {attrs}/>"
    inner = content if tag == "svg" else _e(content)
    return f"<{tag} {attrs}>{inner}</{tag}>"


def _stage_table(m: RunManifest) -> str:
    longest = max((r.compute_seconds or 0.0 for r in m.stages), default=0.0) or 1.0
    rows = []
    for r in m.stages:
        bar = Raw(f"<span class=bar style='width:{round(100 * (r.compute_seconds or 0.0) / longest)}px'></span>")
        status = Raw(f"<span class=status-{r.status}>{r.status}</span>" + (f" {_e(r.error)}" if r.error else ""))
        rows.append((r.name, r.stage, status, r.seconds, r.compute_seconds if r.compute_seconds is not None else "", bar,
                     _bytes(r.peak_memory), _bytes(r.peak_gpu_memory), _bytes(r.bytes), Raw(f"<code>{r.key[:12]}</code>")))  # fmt: skip
    header = ("stage", "type", "status", "wall s (this run)", "compute s", "", "peak memory", "peak GPU", "bytes", "key")
    return html_table(header, rows)


def _cost(m: RunManifest) -> str:
    c = m.cost
    if c is None:
        return ""
    return (f"<p>Computed {c.computed_seconds:.2f} s of stages and stored {human_bytes(c.stored_bytes)}; reused "
            f"{c.reused_seconds:.2f} s and {human_bytes(c.reused_bytes)} from the cache. Peak memory of a computed stage "
            f"{_bytes(c.peak_memory) or 'n/a'}" + (f", GPU {_bytes(c.peak_gpu_memory)}" if c.peak_gpu_memory else "") + ".</p>")


def _by_clip(views: Sequence[EditView]) -> list[tuple[str, list[EditView]]]:
    groups: dict[str, list[EditView]] = {}
    for view in views:
        groups.setdefault(view.manifest.input.url, []).append(view)
    return [(PurePosixPath(url).name, group) for url, group in groups.items()]


def scaled_down(frames: np.ndarray, side: int) -> np.ndarray:
    """``frames`` ``(F, H, W, 3)`` scaled down by a whole factor (every n-th pixel) to at most ``side`` pixels a side."""
    step = -(-max(frames.shape[1:3]) // side)
    return frames[:, ::step, ::step] if step > 1 else frames


def _bytes(value: int | None) -> str:
    return "" if value is None else human_bytes(value)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _image_url(data: bytes) -> str:
    """A data URL of a kept picture: a PNG, or a JPEG (a large one, see StageContext.picture)."""
    kind = "jpeg" if data[:2] == b"\xff\xd8" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def _jpeg_url(frame: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
    return f"data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}"
