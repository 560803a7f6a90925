"""What a run shows in the Prefect UI: markdown summaries, tables and pictures.

Pictures are PNG files kept in the store under ``pictures/<stage>/<key>/<name>.png`` (so a cached
stage's pictures stay valid) and linked by a URL the browser can load:

* ``REELFLOW_PICTURES_URL`` set: that base URL plus the path below ``pictures/``; on a local store
  ``reelflow serve-pictures`` serves exactly that directory;
* an object store (s3://, gs://, ...): a presigned URL valid for ``REELFLOW_PICTURE_URL_SECONDS``;
* otherwise the picture is embedded as a data URL, which needs no server at all: the PNG itself when
  it is at most ``EMBED_BYTES``, else a JPEG thumbnail of at most that size, with the full-size PNG's
  place in the store named under it. A keyed artifact's whole markdown rides in one Prefect event
  (``prefect.artifact-collection.created``/``updated``), and the server drops events over
  ``PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES`` (1.5 MB by default), so a full-size contact sheet
  of real frames (megabytes) must never be embedded.

Outside a Prefect run (``task.fn()`` in tests, a plain loop) nothing is published.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit
from typing import Any

import numpy as np
import zarr
from PIL import Image, ImageDraw
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext, TaskRunContext

from reelflow.schemas.calls import StageCall
from reelflow.schemas.settings import Settings
from reelflow.storage.files import human_bytes, is_local, put_atomic, url_to_fs
from reelflow.storage.store import PICTURES, ArtifactStore

MIN_TILE, MAX_TILE = 96, 256  # a contact sheet's tiles, pixels a side
COLUMNS = 4  # frames a row of a contact sheet
MAX_ROWS = 24  # arrays listed in a stage summary
_GAP, _GREY, _LABEL = 3, 128, 16
# The largest picture embedded as is, and the bound on a thumbnail: a few pictures per markdown stay
# far below Prefect's 1.5 MB event limit (a data URL is 4/3 of the bytes).
EMBED_BYTES = 128 * 1024
KEEP_PNG_BYTES = 256 * 1024  # a stage's picture over this is kept as a JPEG (see StageContext.picture)
JPEG_QUALITY = 90


def contact_sheet(
    frames: np.ndarray,
    rows: Sequence[np.ndarray] = (),
    *,
    labels: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    key: str | None = None,
    columns: int = COLUMNS,
) -> bytes:
    """PNG of frames side by side: ``(F, h, w)`` in [0, 1] (drawn as a heat map) or uint8 ``(F, h, w, 3)``.

    Each of ``rows`` (same layout as ``frames``) is drawn under it, so a frame and what was made of it stand
    in one column; ``labels`` (one per frame: its source frame number and time) go above the columns, and
    ``row_labels`` (one per series, ``frames`` first) above each row. At most ``columns`` frames a row (more
    wrap into blocks below), each tile scaled to between MIN_TILE and MAX_TILE pixels a side, so the sheet
    stays legible at the width the UI shows it; grey separators stay visible on white and black content
    alike. A sheet with a heat map (or given a ``key``: the scale of heat maps already drawn, as by
    :func:`overlay`) ends with its colour key, ``key`` stating what 0 and 1 mean.
    """
    columns = max(1, min(columns, len(frames)))
    series = [_tiles(f) for f in (frames, *rows)]
    height, width = series[0][0].shape[:2]
    blocks = []
    for start in range(0, len(frames), columns):
        stop = min(start + columns, len(frames))
        lines = []
        if labels:
            cells = [_label(labels[i] if i < len(labels) else "", width) for i in range(start, stop)]
            cells += [_blank(_LABEL, width)] * (columns - (stop - start))
            lines.append(np.pad(np.concatenate(cells, axis=1), ((0, 0), (_GAP, 0), (0, 0)), constant_values=255))
        for index, tiles in enumerate(series):
            if index < len(row_labels) and row_labels[index]:
                lines.append(_strip(row_labels[index], columns * (width + _GAP) + _GAP))
            cells = [np.pad(tiles[i], ((0, 0), (0, _GAP), (0, 0)), constant_values=_GREY) for i in range(start, stop)]
            cells += [_blank(height, width)] * (columns - (stop - start))
            top = _GAP if index == 0 else 0
            lines.append(np.pad(np.concatenate(cells, axis=1), ((top, _GAP), (_GAP, 0), (0, 0)), constant_values=_GREY))
        blocks.append(np.concatenate(lines, axis=0))
    if key is not None or any(f.ndim == 3 for f in (frames, *rows)):
        blocks.append(_colour_key(blocks[0].shape[1], key or "values in [0, 1]"))
    sheet = np.concatenate(blocks, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, format="PNG")
    return buffer.getvalue()


def _tiles(frames: np.ndarray) -> list[np.ndarray]:
    if frames.ndim == 3:
        frames = _heat(frames.astype(np.float32))
    side = max(frames.shape[1:3])
    if side > MAX_TILE:
        step = -(-side // MAX_TILE)
        frames = frames[:, ::step, ::step]
    scale = max(1, -(-MIN_TILE // max(frames.shape[1:3])))  # small frames up to MIN_TILE at least
    return [np.kron(frame, np.ones((scale, scale, 1), dtype=np.uint8)) for frame in frames]


def _blank(height: int, width: int) -> np.ndarray:
    return np.full((height, width + _GAP, 3), 255, np.uint8)


def _label(text: str, width: int) -> np.ndarray:
    image = Image.new("RGB", (width + _GAP, _LABEL), (255, 255, 255))
    ImageDraw.Draw(image).text((2, 2), text, fill=(30, 30, 30))
    return np.asarray(image)


def _strip(text: str, width: int) -> np.ndarray:
    """A row's name: dark text on a light band across the sheet."""
    image = Image.new("RGB", (width, _LABEL + 2), (235, 235, 235))
    ImageDraw.Draw(image).text((4, 3), text, fill=(20, 20, 20))
    return np.asarray(image)


def _colour_key(width: int, text: str) -> np.ndarray:
    """The heat map's colours from 0 (left) to 1 (right), ``text`` (what the values are) under the bar."""
    span = max(16, min(256, width - 40))
    bar = _heat(np.tile(np.linspace(0.0, 1.0, span, dtype=np.float32), (10, 1)))
    image = Image.new("RGB", (width, 26), (255, 255, 255))
    image.paste(Image.fromarray(bar), (14, 0))
    draw = ImageDraw.Draw(image)
    draw.text((2, 0), "0", fill=(30, 30, 30))
    draw.text((span + 18, 0), "1", fill=(30, 30, 30))
    draw.text((14, 12), f"colour key: {text}", fill=(30, 30, 30))
    return np.asarray(image)


def bar_chart(values: np.ndarray, *, height: int = 96, bar: int = 6) -> bytes:
    """PNG of one bar per value (non-negative), scaled so the largest fills ``height``; a line marks the mean."""
    values = np.nan_to_num(np.asarray(values, np.float32).clip(min=0.0))
    top = float(values.max()) or 1.0
    canvas = np.full((height, len(values) * (bar + 1) + 1, 3), 255, np.uint8)
    for i, value in enumerate(values):
        canvas[height - max(1, round(value / top * (height - 1))) :, 1 + i * (bar + 1) : 1 + i * (bar + 1) + bar] = (200, 60, 40)
    canvas[height - 1 - round(float(values.mean()) / top * (height - 1))] = (40, 40, 40)
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay(frames: np.ndarray, maps: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Heat maps over the frames they describe: uint8 ``(F, H, W, 3)`` from frames ``(F, H, W, 3)`` and maps
    ``(F, h, w)`` in [0, 1], each map scaled to its frame's size by nearest neighbour (its cells stay visible)
    and drawn with ``alpha`` over the frame. Draw the sheet with a ``key`` naming the maps' scale."""
    frames = np.asarray(frames)
    scaled = fit(maps, frames.shape[1:3])
    blended = (1 - alpha) * frames.astype(np.float32) + alpha * _heat(scaled).astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8)


def fit(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Maps ``(F, h, w)`` scaled to ``size`` ``(H, W)`` by nearest neighbour, float32: a map at a coarser grid (the
    latents', attention's) drawn beside the frame it describes, tile for tile."""
    height, width = size
    return np.stack([np.asarray(Image.fromarray(np.asarray(m, np.float32)).resize((width, height), Image.Resampling.NEAREST))
                     for m in maps])  # fmt: skip


def latent_view(latents: np.ndarray) -> np.ndarray:
    """False colour of latents ``(N, C, h, w)``, uint8 ``(N, h, w, 3)``: red, green and blue are their first three
    principal components over all N (one projection, so tiles compare), each stretched from its 1st to its 99th
    percentile. Cheap (no VAE) and the same for any count of three channels or more (4 of SD, 16 of Wan, the 3
    of a pixel-space model); one or two channels are shown as they are."""
    x = np.nan_to_num(np.asarray(latents, np.float32))
    count, channels, height, width = x.shape
    flat = np.moveaxis(x, 1, -1).reshape(-1, channels)
    flat = flat - flat.mean(axis=0)
    if channels >= 3:
        sample = flat[:: max(1, len(flat) // 65536)]
        _, _, basis = np.linalg.svd(sample, full_matrices=False)
        basis = basis[:3] * np.sign(basis[:3].sum(axis=1, keepdims=True) + 1e-12)  # a fixed sign per component
        flat = flat @ basis.T
    else:  # one or two channels: shown as they are, blue (and green) left dark
        flat = np.concatenate([flat, np.zeros((len(flat), 3 - channels), np.float32)], axis=1)
    low, high = np.percentile(flat, 1, axis=0), np.percentile(flat, 99, axis=0)
    scaled = (flat - low) / np.where(high > low, high - low, 1.0)
    return (scaled.clip(0, 1) * 255).round().astype(np.uint8).reshape(count, height, width, 3)


def spread(count: int, shown: int = COLUMNS) -> list[int]:
    """At most ``shown`` positions of ``count``, evenly spread from the first to the last."""
    return sorted({round(i) for i in np.linspace(0, count - 1, min(count, shown))}) if count else []


def picture_markdown(store: ArtifactStore, stage: str, key: str, name: str, png: bytes, suffix: str = "png") -> str:
    """Save ``png`` in the store beside the artifact it depicts; return markdown that names it by its place in
    the store (``![name](picture:<path>)``), which :func:`resolve_pictures` turns into a URL when the card is
    published. Kept unresolved in the stored card, so a cached stage's card is published again with fresh URLs
    (presigned ones expire)."""
    name = artifact_key(name) or "picture"  # a name the token's syntax and any URL take as is
    rel = f"{PICTURES}/{stage}/{key}/{name}.{suffix}"
    put_atomic(store.fs, store.abspath(rel), png, content_type=f"image/{suffix}")
    return f"![{name}]({PICTURE_SCHEME}{rel})"


PICTURE_SCHEME = "picture:"
IMAGE_SUFFIXES = (".png", ".jpeg", ".webp")  # what a picture token may show (a kept video is only linked)
_PICTURE = re.compile(r"!\[([^\]]*)\]\(picture:([^)\s]+)\)")
_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(picture:([^)\s]+)\)")  # a file of pictures/ (JSON, a video) to open


def resolve_pictures(markdown: str, store: ArtifactStore, settings: Settings) -> str:
    """``markdown`` with each picture saved by :func:`picture_markdown` linked by a URL the browser can load: the
    picture (or its thumbnail), and a link to the full-size PNG where it has a URL of its own. A plain link to a
    file of ``pictures/`` (``[text](picture:<path>)``: a summary's JSON, an output video) gets the file's URL on the
    picture server or presigned; where there is neither, its place in the store is named instead."""

    def resolve(match: re.Match) -> str:
        name, rel = match[1], match[2]
        if not rel.startswith(f"{PICTURES}/") or ".." in rel.split("/") or PurePosixPath(rel).suffix not in IMAGE_SUFFIXES:
            return f"*{name}: not a picture of the store*"  # text from a prompt never reads the store
        url = served_url(store, rel, settings)
        if url is not None:  # served or presigned: no need to read the picture
            return f"![{name}]({url})\n\n[{name} at full size]({url})"
        try:
            png = store.fs.cat_file(store.abspath(rel))
        except (FileNotFoundError, OSError):
            return f"*{name}: picture `{store.url_of(rel)}` is missing (collected since?)*"
        url = picture_url(store, rel, png, settings)
        if url.startswith("data:"):
            if len(png) > EMBED_BYTES:
                return f"![{name}]({url})\n\n*thumbnail; the full-size picture ({human_bytes(len(png))}) is `{store.url_of(rel)}`*"
            return f"![{name}]({url})"
        # A separate link: the UI's markdown renderer does not show an image inside a link.
        return f"![{name}]({url})\n\n[{name} at full size]({url})"

    def link(match: re.Match) -> str:
        text, rel = match[1], match[2]
        if not rel.startswith(f"{PICTURES}/") or ".." in rel.split("/"):
            return f"*{text}: not a file of the store*"
        url = served_url(store, rel, settings)
        return f"[{text}]({url})" if url is not None else f"{text}: `{store.url_of(rel)}`"

    return _LINK.sub(link, _PICTURE.sub(resolve, markdown))


def served_url(store: ArtifactStore, rel: str, settings: Settings) -> str | None:
    """The picture's URL on the picture server, or presigned on an object store; None where it must be embedded."""
    if settings.pictures_url:
        return f"{settings.pictures_url.rstrip('/')}/{rel.removeprefix(PICTURES + '/')}"
    if not store.atomic_rename and store.fs.protocol not in ("memory", ("memory",)):
        try:
            return store.fs.sign(store.abspath(rel), expiration=settings.picture_url_seconds)
        except NotImplementedError:
            pass
        except Exception as exc:  # noqa: BLE001  (no signing credentials must not fail a finished stage)
            logging.getLogger(__name__).warning("cannot presign %s (%s); embedding the picture instead", rel, exc)
    return None


def picture_url(store: ArtifactStore, rel: str, png: bytes, settings: Settings) -> str:
    served = served_url(store, rel, settings)
    if served is not None:
        return served
    if len(png) <= EMBED_BYTES:
        return f"data:image/{PurePosixPath(rel).suffix.lstrip('.') or 'png'};base64,{base64.b64encode(png).decode()}"
    return f"data:image/jpeg;base64,{base64.b64encode(thumbnail(png, EMBED_BYTES)).decode()}"


def as_jpeg(png: bytes, quality: int = JPEG_QUALITY) -> bytes:
    """``png`` as a JPEG of the same size."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def thumbnail(png: bytes, max_bytes: int) -> bytes:
    """A JPEG of ``png``, scaled down until it takes at most ``max_bytes`` (a 1x1 one takes what it takes)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    scale = 1.0
    while True:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        buffer = io.BytesIO()
        image.resize(size, Image.Resampling.LANCZOS).save(buffer, format="JPEG", quality=85)
        if buffer.tell() <= max_bytes or size == (1, 1):
            return buffer.getvalue()
        scale *= min(0.9, math.sqrt(max_bytes / buffer.tell()))  # the encoded size goes about with the pixels


def clip_label(url: str) -> str:
    """A clip's name in the UI: its file stem and a hash of its URL (intro.mp4 of one folder is not another's)."""
    stem = PurePosixPath(url).stem
    return f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:6]}"


def card_key(call: StageCall) -> str:
    """The key of a stage's card: clip, pipeline, place in the pipeline and stage id, so a run's cards sort in
    pipeline order and the global Artifacts page tells clips apart (the clip is shortened to fit 100 characters)."""
    rest = artifact_key(f"{call.pipeline}-{call.position + 1:02d}-{call.stage_id}")
    stem, _, digest = call.clip.rpartition("-")  # the stem is shortened, never the URL's hash
    stem, digest = artifact_key(stem), artifact_key(digest)
    stem = stem[: max(0, 98 - len(rest) - len(digest))].strip("-")
    clip = f"{stem}-{digest}" if stem else digest
    return artifact_key(f"{clip}-{rest}" if clip else rest)


def artifact_key(name: str) -> str:
    """``name`` as a valid artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:100]


def in_run() -> bool:
    """Whether this code runs inside a Prefect flow or task run (so artifacts have a home)."""
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def publish_markdown(name: str, markdown: str, description: str = "") -> None:
    """A keyed markdown artifact (``name`` is made a valid key), only inside a Prefect run.

    Best effort: the UI is a view of the work, so an API hiccup is logged, never raised.
    """
    if in_run():
        _best_effort(create_markdown_artifact, markdown, key=artifact_key(name), description=description)


def publish_table(name: str, rows: list[dict[str, Any]], description: str = "") -> None:
    """A keyed table artifact, one row per dict, only inside a Prefect run (best effort too)."""
    if in_run() and rows:
        _best_effort(create_table_artifact, rows, key=artifact_key(name), description=description)


def publish_link(name: str, url: str, text: str, description: str = "") -> None:
    """A keyed link artifact, only inside a Prefect run (best effort too)."""
    if in_run():
        _best_effort(create_link_artifact, url, link_text=text, key=artifact_key(name), description=description)


def browser_url(url: str, settings: Settings) -> str:
    """A URL a browser can open for a file the run wrote: a presigned one on an object store where it can sign,
    else ``file://`` for a local path (opens on this machine), else ``url`` itself."""
    if is_local(url):
        return Path(url.removeprefix("file://")).resolve().as_uri()
    fs, path = url_to_fs(url, settings.storage_options)
    try:
        return fs.sign(path, expiration=settings.picture_url_seconds)
    except Exception:  # noqa: BLE001  (unsignable: the plain URL still says where it is)
        return url


def _best_effort(create: Any, *args: Any, **kwargs: Any) -> None:
    try:
        create(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        logging.getLogger(__name__).warning("could not publish artifact %s: %s", kwargs.get("key"), exc)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def artifact_summary(store: ArtifactStore, stage: str, key: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """One stored artifact as plain data: its place, every array in it (nested groups too: an attention store's)
    with shape, dtype, dims, chunks and bytes, its total in the store and its attrs (provenance included). Kept
    as ``summary.json`` beside the stage's card, where the browser can open it."""
    rel = store.artifact_path(stage, key)
    group = store.open(stage, key)
    arrays = sorted((path, member) for path, member in group.members(max_depth=None) if isinstance(member, zarr.Array))
    return {
        "stage": stage,
        "key": key,
        "url": store.url_of(rel),
        "stored_bytes": store.size(rel),
        "arrays": {name: {"shape": list(array.shape), "dtype": str(array.dtype), "dims": list(array.metadata.dimension_names or ()),
                          "chunks": list(array.chunks), "bytes": array.nbytes, "stored_bytes": array.nbytes_stored()}
                   for name, array in arrays},  # fmt: skip
        "attrs": _without_secrets(dict(attrs)),
    }


def _without_secrets(value: Any) -> Any:
    """``value`` with every URL's user info and query (credentials, signatures) removed: the summary is served."""
    if isinstance(value, dict):
        return {k: _without_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_secrets(v) for v in value]
    if isinstance(value, str) and _URL.match(value):
        parts = urlsplit(value)
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    return value


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def stage_summary(summary: Mapping[str, Any]) -> str:
    """Markdown of an :func:`artifact_summary`: the arrays (at most MAX_ROWS), the total in the store, timing,
    inputs, and the store path, linked to the summary as JSON."""
    arrays = list(summary["arrays"].items())
    rows = [(f"`{name}`", str(tuple(a["shape"])), a["dtype"], f"({', '.join(a['dims'])})", str(tuple(a["chunks"])),
             human_bytes(a["bytes"]), human_bytes(a["stored_bytes"])) for name, a in arrays[:MAX_ROWS]]  # fmt: skip
    if len(arrays) > MAX_ROWS:
        rows.append((f"... {len(arrays) - MAX_ROWS} more arrays (all in the JSON)", "", "", "", "", "", ""))
    attrs = summary["attrs"]
    prov = attrs.get("provenance", {})
    inputs = ", ".join(f"{slot} `{ref['key'][:12]}`" for slot, ref in prov.get("inputs", {}).items()) or "none"
    json_link = f"{PICTURE_SCHEME}{summary_path(summary['stage'], summary['key'])}"
    lines = [
        markdown_table(("array", "shape", "dtype", "dims", "chunks", "in memory", "stored"), rows),
        "",
        f"{human_bytes(summary['stored_bytes'])} in the store; computed in {attrs.get('seconds', 0):.2f} s on "
        f"{prov.get('host', '?')} ({prov.get('device', '?')}) by run `{prov.get('run_id', '?')}`; "
        f"key `{summary['key'][:16]}`; inputs: {inputs}",
        "",
        f"store: `{summary['url']}` ([summary as JSON]({json_link}))",
    ]
    return "\n".join(lines)


def summary_path(stage: str, key: str) -> str:
    return f"{PICTURES}/{stage}/{key}/summary.json"


def _heat(values: np.ndarray) -> np.ndarray:
    """Black -> red -> yellow -> white colour map of values in [0, 1], uint8 ``(..., 3)``."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)
