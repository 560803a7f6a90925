"""The pipeline spec: what a user declares in YAML, validated as a graph before anything runs."""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Union

from pydantic import Field, model_validator

from reelflow.schemas.base import DType, Model
import reelflow.schemas.fatezero  # noqa: F401  (registers the FateZero stages before AnyStage is built)
from reelflow.schemas.graph import Graph, resolve_graph
from reelflow.schemas.stages import STAGE_TYPES

AnyStage = Annotated[Union[tuple(STAGE_TYPES.values())], Field(discriminator="stage")]  # noqa: UP007


class ModelSpec(Model):
    """A diffusers model bundle, named by hub id or local path."""

    id: str = Field(description="Hub id (e.g. 'stable-diffusion-v1-5/stable-diffusion-v1-5') or a local directory.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit); None is 'main'.")
    dtype: DType | None = Field(default=None, description="Weights dtype; None uses the worker's setting.")


class PipelineSpec(Model):
    """A declared edit: the stages, how they are wired, which models they use."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64, description="Pipeline name, used in run names and output files.")
    description: str = Field(default="", description="What the pipeline does.")
    input: str | None = Field(default=None, description="Source video: a path or fsspec URL (the CLI's --input sets it).")
    stages: list[AnyStage] = Field(min_length=1, description="The stages; each is tagged by its `stage` type.")
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="Models by name, referenced by stages.")
    seed: int = Field(default=0, ge=0, description="Seed for every stochastic stage.")
    store: str | None = Field(default=None, description="Artifact store URL; None uses the REELFLOW_STORE setting.")
    output: str = Field(default="outputs", description="Directory (or URL) for the output video and run manifest.")

    @model_validator(mode="after")
    def _check_graph(self) -> PipelineSpec:
        _ = self.graph
        return self

    @cached_property
    def graph(self) -> Graph:
        """The wired stages in topological order; raises GraphError when the wiring is wrong."""
        return resolve_graph(self.stages, list(self.models))
