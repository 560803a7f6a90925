"""The pipeline spec: what a user declares in YAML, validated as a graph before anything runs."""

from __future__ import annotations

from functools import cached_property
from string import Formatter
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from reelflow.schemas.base import DType, Model
from reelflow.schemas.errors import GraphError
from reelflow.schemas.graph import Graph, resolve_graph
from reelflow.schemas.registry import load_methods
from reelflow.schemas.stages import STAGE_TYPES, SourceKind, methods_of, stage_tag

load_methods()  # every installed method declares its stages before the stage union is built

VIDEO = "video"
SIDECAR_FIELDS = ("stem", "name")


def _tag_of(value: Any) -> str | None:
    """The (stage, method) tag of a stage entry; a stage with one implementation needs no method."""
    get = value.get if isinstance(value, dict) else lambda name: getattr(value, name, None)
    stage, method = get("stage"), get("method")
    if (stage, method) in STAGE_TYPES:
        return stage_tag(stage, method)
    methods = methods_of(stage) if isinstance(stage, str) else []
    return stage_tag(stage, methods[0]) if method is None and len(methods) == 1 else None


AnyStage = Annotated[
    Union[tuple(Annotated[cls, Tag(stage_tag(*key))] for key, cls in STAGE_TYPES.items())],  # noqa: UP007
    Discriminator(_tag_of),
]


def check_stage_tag(entry: Any) -> None:
    """Raise GraphError naming the valid stages or methods when ``entry`` names neither."""
    if not isinstance(entry, dict) or _tag_of(entry) is not None:
        return
    stage, method = entry.get("stage"), entry.get("method")
    stages = sorted({name for name, _ in STAGE_TYPES})
    if stage not in stages:
        raise GraphError(f"stage {stage!r} is not a stage; stages: {', '.join(map(repr, stages))} (see `reelflow stages`)")
    methods = sorted(m for m in methods_of(stage) if m is not None)
    if method is None:
        raise GraphError(f"stage {stage!r} has several methods ({', '.join(map(repr, methods))}); set `method:`")
    valid = ", ".join(map(repr, methods)) or "none: leave `method` out"
    raise GraphError(f"stage {stage!r} has no method {method!r}; its methods: {valid}")


Offload = Literal["none", "group"]


class ModelSpec(Model):
    """A model, named by hub id or local path."""

    id: str = Field(description="Hub id (e.g. 'stable-diffusion-v1-5/stable-diffusion-v1-5') or a local directory.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit); None is 'main'.")
    dtype: DType | None = Field(default=None, description="Weights dtype; None uses the worker's setting.")
    family: str | None = Field(
        default=None,
        description="Loader family (diffusers, transformers, timm, torchvision); None: inferred from the model's files.",
    )
    tiny: str | None = Field(
        default=None,
        description="The tiny model `reelflow demo` puts in its place (a name `reelflow models tiny --kind` knows); "
        "None: the one its roles name.",
    )
    offload: Offload = Field(
        default="none",
        description="How the model's weights meet a GPU too small for them: group keeps them in CPU memory and moves "
        "one block of layers at a time onto the GPU as it runs (diffusers' group offloading; slower, a fraction of "
        "the memory); none loads them onto the worker's device.",
    )
    weight_name: str | None = Field(
        default=None,
        description="The one weight file to read, for a repo that publishes several side by side (family ip_adapter: "
        "'models/ip-adapter_sd15.safetensors'); a safetensors path inside the model.",
    )

    @field_validator("weight_name")
    @classmethod
    def _check_weight_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.endswith(".safetensors") or value.startswith("/") or ".." in value.split("/")):
            raise ValueError(f"weight_name {value!r} must be a .safetensors file inside the model, e.g. "
                             "'models/ip-adapter_sd15.safetensors' (weights load as safetensors only)")  # fmt: skip
        return value


class SourceSpec(Model):
    """A file the pipeline reads besides the video: an edited frame, a reference image, an audio clip, a mask."""

    kind: SourceKind = Field(description="What the file is: video, image, audio or mask.")
    path: str | None = Field(default=None, description="Path or fsspec URL; the CLI's --source NAME=PATH sets it.")
    sidecar: str | None = Field(
        default=None,
        description="Where to find it beside each video when no path is given, e.g. '{stem}.edit.png' "
        "({stem}: the video's name without extension, {name}: with it).",
    )
    description: str = Field(default="", description="What the source is for.")

    @field_validator("sidecar")
    @classmethod
    def _check_sidecar(cls, value: str | None) -> str | None:
        if value is not None:
            fields = {name for _, name, _, _ in Formatter().parse(value) if name is not None}
            if fields - set(SIDECAR_FIELDS) or ".." in value or value.startswith("/"):
                raise ValueError(
                    f"sidecar {value!r} must be a path below the video's folder using only {{stem}} and {{name}}, "
                    "e.g. '{stem}.edit.png'"
                )
        return value


class PipelineSpec(Model):
    """A declared edit: the stages, how they are wired, which models and sources they use."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64, description="Pipeline name, used in run names and output files.")
    description: str = Field(default="", description="What the pipeline does.")
    input: str | None = Field(default=None, description="Source video: a path or fsspec URL (the CLI's --input sets it).")
    sources: dict[str, SourceSpec] = Field(
        default_factory=dict, description="Named files besides the video (the video itself is the source `video`)."
    )
    stages: list[AnyStage] = Field(min_length=1, description="The stages; each is tagged by its `stage` (and `method`).")
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="Models by name, referenced by stages' roles.")
    seed: int = Field(default=0, ge=0, description="Seed for every stochastic stage.")
    store: str | None = Field(default=None, description="Artifact store URL; None uses the REELFLOW_STORE setting.")
    output: str = Field(default="outputs", description="Directory (or URL) for the output video and run manifest.")

    @model_validator(mode="before")
    @classmethod
    def _check_tags(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("stages"), list):
            for entry in data["stages"]:
                check_stage_tag(entry)
        return data

    @field_validator("sources")
    @classmethod
    def _no_video_source(cls, sources: dict[str, SourceSpec]) -> dict[str, SourceSpec]:
        if VIDEO in sources:
            raise ValueError("the source 'video' is the pipeline's `input`; set `input:` (or --input) instead")
        return sources

    @model_validator(mode="after")
    def _check_graph(self) -> PipelineSpec:
        _ = self.graph
        return self

    @property
    def source_kinds(self) -> dict[str, str]:
        return {VIDEO: "video", **{name: source.kind for name, source in self.sources.items()}}

    @cached_property
    def graph(self) -> Graph:
        """The wired stages in topological order; raises GraphError when the wiring is wrong."""
        families = {name: model.family for name, model in self.models.items()}
        return resolve_graph(self.stages, families, self.source_kinds)

    def used_sources(self) -> list[str]:
        """Names of the sources some stage reads, in declaration order (the video first)."""
        used = {name for node in self.graph.order() for name in node.sources.values()}
        return [name for name in self.source_kinds if name in used]
