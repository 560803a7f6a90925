"""Preflight: per-stage checks that run after a run is planned and before any model loads.

A method registers a check for one of its stages with ``@stage_check(stage, method)``, in the same
implementation module as its task body. A check reads what is cheap to know (the headers of the
stage's source files, the JSON configs of its planned models, the frames its inputs will hold) and
either refuses the input with a ``ValueError`` ("clip has 8 frames but the model needs 14"), logs how
it will treat it, or returns a :class:`FramesPreview` of the frames its own output will hold.

Previews flow down the graph: a stage's preview is what its check returns, or, when it has no check
or the check returns None, the preview of its first input slot (in the order of its ``slots``) that
has one. A stage keeps its input's frames unless its check says otherwise; so encode_latents needs
no check for a later stage to know how many frames it will see.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import fsspec
from PIL import Image

from reelflow.core.frames import Fit
from reelflow.core.masks import probe_masks
from reelflow.core.video import VideoInfo, probe_video
from reelflow.schemas.calls import SourceRef, StageCall
from reelflow.schemas.errors import ReelflowError, RegistryError, SpecError
from reelflow.schemas.graph import Node
from reelflow.schemas.settings import Settings
from reelflow.schemas.stages import STAGE_TYPES, StageSpec, stage_tag
from reelflow.storage.files import url_to_fs
from reelflow.tasks.models import role_json

LOGGER = logging.getLogger("reelflow.preflight")


@dataclass(frozen=True)
class SourceInfo:
    """What a cheap probe of a source file tells; None where it does not apply to the kind.

    ``width``/``height`` for images, masks and videos; ``num_frames``, ``fps`` and the whole header
    probe ``video`` (duration, codec, audio) for videos; nothing beyond kind and URL for audio.
    """

    kind: str
    url: str
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: Fraction | None = None
    video: VideoInfo | None = None


@dataclass(frozen=True)
class FramesPreview:
    """The frames a stage's output will hold: ``count`` frames of ``height`` x ``width`` pixels, made
    from a ``source_width`` x ``source_height`` video by cropping or padding (``fit``), with or without
    the source's sound track (``has_audio``)."""

    count: int
    height: int
    width: int
    source_width: int
    source_height: int
    fit: Fit
    has_audio: bool | None = None  # whether the frames come with the source's sound track; None: not told
    source_frames: int | None = None  # frames in the whole source video; None: not told


class PlannedLike(Protocol):
    """A planned stage as the DAG engine makes it (flows.dag.PlannedStage): its graph node and its call."""

    @property
    def node(self) -> Node: ...

    @property
    def call(self) -> StageCall: ...


Check = Callable[["PreflightContext"], "FramesPreview | None"]
CHECKS: dict[tuple[str, str | None], Check] = {}


def stage_check(stage: str, method: str | None = None) -> Callable[[Check], Check]:
    """Register ``fn(ctx) -> FramesPreview | None`` as the preflight check of the declared ``(stage, method)``."""

    def register(fn: Check) -> Check:
        key = (stage, method)
        if key not in STAGE_TYPES:
            raise RegistryError(
                f"{fn.__module__}.{fn.__qualname__} checks stage {stage_tag(*key)}, which no method declares; "
                "declare it (a StageSpec subclass with @register_stage) in the module its method's entry point loads"
            )
        CHECKS[key] = fn
        return fn

    return register


class PreflightContext:
    """What a check gets: the stage's ``spec`` and ``stage_id``, a ``logger``, and cheap views of its
    sources, its inputs' frames and its models' configs."""

    def __init__(
        self,
        planned: PlannedLike,
        previews: Mapping[str, FramesPreview | None],
        probes: dict[str, SourceInfo],
        settings: Settings,
    ) -> None:
        self.spec: StageSpec = planned.node.spec
        self.stage_id: str = planned.node.id
        self.logger: logging.Logger = LOGGER
        self._node, self._call = planned.node, planned.call
        self._previews, self._probes, self._settings = previews, probes, settings

    def has_source(self, slot: str) -> bool:
        """Whether the stage reads a file through source ``slot`` in this run (an optional one may be absent)."""
        return slot in self._call.sources

    def source_location(self, slot: str) -> tuple[Any, str]:
        """``(filesystem, path)`` of the file or folder the stage reads through source ``slot`` (a mask sequence
        is a folder), for checks that read more than a header."""
        self.source(slot)  # the same refusal for a slot the stage does not read
        ref = self._call.sources[slot]
        return url_to_fs(ref.url, ref.storage_options)

    def source(self, slot: str) -> SourceInfo:
        """The probe of the file the stage reads through source ``slot`` (probed once per URL per run)."""
        if slot not in self._call.sources:
            named = ", ".join(self._call.sources) or "none"
            raise KeyError(f"stage {self.stage_id!r} reads no source {slot!r}; its sources: {named}")
        ref = self._call.sources[slot]
        if ref.url not in self._probes:
            self._probes[ref.url] = probe_source(ref)
        return self._probes[ref.url]

    def has_input(self, slot: str) -> bool:
        """Whether input ``slot`` is wired in this run (an optional one may be absent)."""
        return slot in self._node.inputs

    def model_family(self, role: str) -> str | None:
        """The family of the model planned for ``role``; None when the stage fills no such role (an optional one)."""
        model = self._call.models.get(role)
        return None if model is None else model.family

    def input(self, slot: str) -> FramesPreview | None:
        """The preview of the frames the producer of input ``slot`` will make; None when nothing tells."""
        if slot not in self._node.inputs:
            named = ", ".join(self._node.inputs) or "none"
            raise KeyError(f"stage {self.stage_id!r} has no input {slot!r}; its inputs: {named}")
        return self._previews.get(self._node.inputs[slot])

    def model_config(self, role: str, component: str | None = None, name: str = "config.json") -> dict[str, Any] | None:
        """The JSON file ``name`` of the model planned for ``role``, read without loading weights
        (:func:`reelflow.tasks.models.role_json`: ``unet/config.json`` of a bundle, ``config.json`` of another)."""
        return role_json(self._call.models, role, component, name, self._settings, self.stage_id)


def probe_source(ref: SourceRef) -> SourceInfo:
    """Read a source's headers: a video's size, frame count and rate, an image's size, a mask source's size and
    count (``num_frames``: 1 for one image, else one per image of a folder or frame of a video)."""
    if ref.kind == "mask":
        layout = probe_masks(*url_to_fs(ref.url, ref.storage_options))
        return SourceInfo(ref.kind, ref.url, layout.width, layout.height, layout.count)
    with fsspec.open(ref.url, "rb", **ref.storage_options) as handle:
        if ref.kind == "video":
            info = probe_video(handle)
            return SourceInfo(ref.kind, ref.url, info.width, info.height, info.num_frames, info.fps, info)
        if ref.kind == "image":
            with Image.open(handle) as image:  # the header alone: size needs no decode
                width, height = image.size
            return SourceInfo(ref.kind, ref.url, width, height)
    return SourceInfo(ref.kind, ref.url)


def preflight(planned: Sequence[PlannedLike], settings: Settings) -> dict[str, FramesPreview | None]:
    """Run every planned stage's check, in the given (topological) order; returns each stage's preview.

    Raises:
        SpecError: A check refused its input with a plain ``ValueError`` (chained as the cause); reelflow's
            own errors (``InputVideoError``, ``ModelError``, ...) keep their type. The message names the
            stage. Any other exception propagates.
    """
    previews: dict[str, FramesPreview | None] = {}
    probes: dict[str, SourceInfo] = {}
    for stage in planned:
        preview = _run_check(PreflightContext(stage, previews, probes, settings))
        previews[stage.node.id] = preview if preview is not None else _passed_through(stage.node, previews)
    return previews


def _run_check(ctx: PreflightContext) -> FramesPreview | None:
    check = CHECKS.get((ctx.spec.stage, ctx.spec.method))
    if check is None:
        return None
    try:
        return check(ctx)
    except ValueError as exc:  # the stage's name is what a check's message lacks; reelflow's errors keep their type
        error = type(exc) if isinstance(exc, ReelflowError) else SpecError
        raise error(f"stage {ctx.stage_id!r} ({ctx.spec.tag}): {exc}") from exc


def _passed_through(node: Node, previews: Mapping[str, FramesPreview | None]) -> FramesPreview | None:
    """The preview of the first input slot, in the spec's ``slots`` order, whose producer has one."""
    for slot in node.spec.slots:
        preview = previews.get(node.inputs.get(slot, ""))
        if preview is not None:
            return preview
    return None
