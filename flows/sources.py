"""A run's sources: where each file is, whether it is usable, and the hash of its bytes.

The video is the source ``video`` (the spec's ``input``). Every other source a stage reads comes
from its ``path`` (the CLI's ``--source NAME=PATH``) or, when it has none, from its ``sidecar``
pattern beside the video (``{stem}.edit.png``), which is how each clip of a bulk edit gets its own.
All of them are checked (present, not empty, readable as their kind) before any model loads, and
hashed into the keys of the stages that read them. A mask source may also be a folder (an image
sequence, one image per frame in name order), hashed over its files' names and bytes. A source only read optionally (a stage's
``optional_reads``, such as a mask) whose file is not there is left out of that run instead, so in a
bulk edit the clips that bring one use it and the others do without.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping
from pathlib import PurePosixPath

import fsspec
from fsspec.implementations.local import LocalFileSystem

from reelflow.core.masks import probe_masks, sequence_files
from reelflow.core.sources import check_source
from reelflow.schemas.calls import SourceRef
from reelflow.schemas.errors import InputVideoError, SourceError, SpecError
from reelflow.schemas.pipeline import VIDEO, PipelineSpec
from reelflow.schemas.settings import Settings
from reelflow.storage.files import url_to_fs
from reelflow.storage.keys import content_key


def source_urls(spec: PipelineSpec) -> dict[str, str]:
    """URL of the video (always: outputs are named after it) and of every other source a stage reads;
    raises when one has no location."""
    if not spec.input:
        raise InputVideoError(f"pipeline {spec.name!r} has no input video; pass --input VIDEO or set `input:`")
    return {VIDEO: spec.input} | {name: _location(spec, name) for name in spec.used_sources() if name != VIDEO}


def _location(spec: PipelineSpec, name: str) -> str:
    source = spec.sources[name]
    if source.path:
        return source.path
    if source.sidecar:
        return sidecar_url(spec.input, source.sidecar)
    raise SourceError(
        f"pipeline {spec.name!r} reads the {source.kind} source {name!r} but gives no file for it; "
        f"pass --source {name}=PATH, or set `sources.{name}.path` or a `sidecar` pattern"
    )


def without_absent_optional_sources(spec: PipelineSpec, settings: Settings) -> PipelineSpec:
    """``spec`` without the sources that only optional slots read and whose file is not there."""
    absent = [name for name in _optional_sources(spec) if not _present(spec, name, settings)]
    if not absent:
        return spec
    raw = spec.model_dump(mode="json")
    raw["sources"] = {name: source for name, source in raw["sources"].items() if name not in absent}
    for stage in raw["stages"]:
        stage["sources"] = {slot: name for slot, name in stage.get("sources", {}).items() if name not in absent}
    from reelflow.schemas.loading import validate_spec

    return validate_spec(raw)


def _optional_sources(spec: PipelineSpec) -> list[str]:
    """Declared sources that every stage reading them reads through an optional slot."""
    required = {name for node in spec.graph.order() for slot, name in node.sources.items()
                if slot not in type(node.spec).optional_reads}  # fmt: skip
    optional = {name for node in spec.graph.order() for name in node.sources.values()}
    return sorted(optional - required)


def _present(spec: PipelineSpec, name: str, settings: Settings) -> bool:
    source = spec.sources[name]
    if source.path:
        return True  # given explicitly: checked, and refused if missing, like any other
    if not source.sidecar or not spec.input:
        return False
    fs, path = url_to_fs(sidecar_url(spec.input, source.sidecar), settings.storage_options)
    return fs.isfile(path) or (source.kind == "mask" and fs.isdir(path))


def sidecar_url(video: str, pattern: str) -> str:
    """The sidecar of ``video`` named by ``pattern`` (``{stem}``, ``{name}``), in the video's folder."""
    scheme, sep, path = video.rpartition("://")
    name = PurePosixPath(path).name
    relative = pattern.format(stem=PurePosixPath(name).stem, name=name)
    return f"{scheme}{sep}{posixpath.join(posixpath.dirname(path), relative)}"


def check_sources(spec: PipelineSpec, settings: Settings) -> dict[str, str]:
    """Every source's URL, after checking each is there, not empty and readable as its kind."""
    urls = source_urls(spec)
    kinds = spec.source_kinds
    for name, url in urls.items():
        fs, path = _existing(name, kinds[name], url, settings)
        if kinds[name] == "mask":
            probe_masks(fs, path)  # one image, a folder of images or a mask video
            continue
        with fs.open(path, "rb") as handle:
            check_source(name, kinds[name], handle)
    return urls


def hash_sources(
    spec: PipelineSpec, urls: dict[str, str], settings: Settings, known: dict[tuple[str, str], SourceRef] | None = None
) -> dict[str, SourceRef]:
    """Each source's content key (sha256 of its size and bytes), size and resolved URL.

    ``known`` (URL, kind) -> ref, filled as files are hashed, lets several pipelines on the same clips
    (a comparison of methods) read each file once.
    """
    known = {} if known is None else known
    refs = {}
    for name, url in urls.items():
        kind = spec.source_kinds[name]
        if (url, kind) not in known:
            known[url, kind] = hash_source(url, kind, settings, name=name)
        refs[name] = known[url, kind]
    return refs


def hash_source(url: str, kind: str, settings: Settings, *, name: str = VIDEO) -> SourceRef:
    fs, path = _existing(name, kind, url, settings)
    local = isinstance(fs, LocalFileSystem)
    files = sequence_files(fs, path) if fs.isdir(path) else [path]
    key = content_key(fs, path) if files == [path] else _folder_key(fs, files)
    return SourceRef(
        url=path if local else fs.unstrip_protocol(path),
        key=key,
        kind=kind,
        size=sum(int(fs.size(f)) for f in files),
        storage_options={} if local else settings.storage_options,
    )


def _folder_key(fs: fsspec.AbstractFileSystem, files: list[str]) -> str:
    """sha256 over a sequence's file names (their order is the frames') and each file's content key."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{PurePosixPath(file).name}:{content_key(fs, file)};".encode())
    return digest.hexdigest()


def _existing(name: str, kind: str, url: str, settings: Settings) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = url_to_fs(url, settings.storage_options)
    error = InputVideoError if name == VIDEO else SourceError
    what = "input video" if name == VIDEO else f"{kind} source {name!r}"
    fix = "check the path or URL" if name == VIDEO else f"check the path, or pass --source {name}=PATH"
    if kind == "mask" and fs.isdir(path):
        if not sequence_files(fs, path):
            raise error(f"{what} {url!r} is a folder without images; give one image per frame, named in frame order")
        return fs, path
    if not fs.isfile(path):
        raise error(f"{what} {url!r} does not exist; {fix}")
    if fs.size(path) == 0:
        raise error(f"{what} {url!r} is empty (0 bytes); re-export or re-download it")
    return fs, path


def source_overrides(spec: PipelineSpec, sources: Mapping[str, str | None]) -> list[str]:
    """Files for named sources as spec overrides (the video is ``input``, the others ``sources.NAME.path``),
    refusing a name the pipeline does not declare."""
    unknown = sorted(set(sources) - set(spec.source_kinds))
    if unknown:
        raise SpecError(
            f"pipeline {spec.name!r} has no source {unknown[0]!r}; its sources: {', '.join(spec.source_kinds)}"
        )
    return [
        f"input={json.dumps(path)}" if name == VIDEO else f"sources.{name}.path={json.dumps(path)}"
        for name, path in sources.items()
        if path is not None
    ]
