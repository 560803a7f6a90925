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


def contact_sheet(
    frames: np.ndarray, rows: Sequence[np.ndarray] = (), *, labels: Sequence[str] = (), columns: int = COLUMNS
) -> bytes:
    """PNG of frames side by side: ``(F, h, w)`` in [0, 1] (drawn as a heat map) or uint8 ``(F, h, w, 3)``.

    Each of ``rows`` (same layout as ``frames``) is drawn under it, so a frame and what was made of it stand
    in one column; ``labels`` (one per frame: its source frame number and time) go above the columns. At
    most ``columns`` frames a row (more wrap into blocks below), each tile scaled to between MIN_TILE and
    MAX_TILE pixels a side, so the sheet stays legible at the width the UI shows it; grey separators stay
    visible on white and black content alike; a sheet with a heat map ends with its colour key.
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
            cells = [np.pad(tiles[i], ((0, 0), (0, _GAP), (0, 0)), constant_values=_GREY) for i in range(start, stop)]
            cells += [_blank(height, width)] * (columns - (stop - start))
            top = _GAP if index == 0 else 0
            lines.append(np.pad(np.concatenate(cells, axis=1), ((top, _GAP), (_GAP, 0), (0, 0)), constant_values=_GREY))
        blocks.append(np.concatenate(lines, axis=0))
    if any(f.ndim == 3 for f in (frames, *rows)):
        blocks.append(_colour_key(blocks[0].shape[1]))
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


def _colour_key(width: int) -> np.ndarray:
    """The heat map's colours from 0 (left) to 1 (right), named under the bar; ``width`` pixels wide."""
    span = max(16, min(256, width - 40))
    bar = _heat(np.tile(np.linspace(0.0, 1.0, span, dtype=np.float32), (10, 1)))
    image = Image.new("RGB", (width, 26), (255, 255, 255))
    image.paste(Image.fromarray(bar), (14, 0))
    draw = ImageDraw.Draw(image)
    draw.text((2, 0), "0", fill=(30, 30, 30))
    draw.text((span + 18, 0), "1", fill=(30, 30, 30))
    draw.text((14, 12), "colour key: values in [0, 1]", fill=(30, 30, 30))
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
_PICTURE = re.compile(r"!\[([^\]]*)\]\(picture:([^)\s]+)\)")


def resolve_pictures(markdown: str, store: ArtifactStore, settings: Settings) -> str:
    """``markdown`` with each picture saved by :func:`picture_markdown` linked by a URL the browser can load: the
    picture (or its thumbnail), and a link to the full-size PNG where it has a URL of its own."""

    def resolve(match: re.Match) -> str:
        name, rel = match[1], match[2]
        if not rel.startswith(f"{PICTURES}/") or ".." in rel.split("/"):  # text from a prompt never reads the store
            return f"*{name}: not a picture of the store*"
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
                return f"![{name}]({url})\n\n*thumbnail; the full-size PNG ({human_bytes(len(png))}) is `{store.url_of(rel)}`*"
            return f"![{name}]({url})"
        # A separate link: the UI's markdown renderer does not show an image inside a link.
        return f"![{name}]({url})\n\n[{name} at full size]({url})"

    return _PICTURE.sub(resolve, markdown)


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


def stage_summary(store: ArtifactStore, stage: str, key: str, attrs: Mapping[str, Any]) -> str:
    """Markdown of one stored artifact: every array in it (nested groups too: an attention store's), with shape,
    dtype, chunks and bytes, the artifact's total in the store, timing, inputs and URL."""
    rel = store.artifact_path(stage, key)
    group = store.open(stage, key)
    arrays = sorted((path, member) for path, member in group.members(max_depth=None) if isinstance(member, zarr.Array))
    rows = []
    for name, array in arrays[:MAX_ROWS]:
        dims = ", ".join(array.metadata.dimension_names or ())
        rows.append((f"`{name}`", str(tuple(array.shape)), str(array.dtype), f"({dims})", str(tuple(array.chunks)),
                     human_bytes(array.nbytes), human_bytes(array.nbytes_stored())))  # fmt: skip
    if len(arrays) > MAX_ROWS:
        rows.append((f"... {len(arrays) - MAX_ROWS} more arrays", "", "", "", "", "", ""))
    prov = attrs.get("provenance", {})
    inputs = ", ".join(f"{slot} `{ref['key'][:12]}`" for slot, ref in prov.get("inputs", {}).items()) or "none"
    lines = [
        markdown_table(("array", "shape", "dtype", "dims", "chunks", "in memory", "stored"), rows),
        "",
        f"{human_bytes(store.size(rel))} in the store; computed in {attrs.get('seconds', 0):.2f} s on "
        f"{prov.get('host', '?')} ({prov.get('device', '?')}) by run `{prov.get('run_id', '?')}`; key `{key[:16]}`; "
        f"inputs: {inputs}",
        "",
        f"store: `{store.url_of(rel)}`",
    ]
    return "\n".join(lines)


def _heat(values: np.ndarray) -> np.ndarray:
    """Black -> red -> yellow -> white colour map of values in [0, 1], uint8 ``(..., 3)``."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)
