"""What the DAG engine hands a stage task: everything that determines its output, plus where to write it."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from reelflow.schemas.base import DType, Model
from reelflow.schemas.pipeline import AnyStage


class StoreSpec(Model):
    """How to reach an artifact store."""

    url: str = Field(description="Root URL of the store.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options.")


class ResolvedModel(Model):
    """A model with its family and dtype settled and its fingerprint taken (no weights loaded)."""

    id: str
    revision: str | None = Field(default=None, description="For hub ids, the commit the spec's revision resolved to.")
    family: str = Field(default="diffusers", description="Loader family.")
    bundle: bool = Field(default=False, description="A diffusers bundle, whose roles load as its subfolders.")
    dtype: DType
    fingerprint: str
    weight_name: str | None = Field(default=None, description="The one weight file read, for families that name one.")
    offload: str = Field(default="none", description="none, or group: weights in CPU memory, onloaded a block at a time.")


class SourceRef(Model):
    """A file a pipeline reads (the video, an edited frame, an audio clip), identified by the hash of its bytes."""

    url: str
    key: str = Field(description="sha256 over the file's size and bytes.")
    kind: str = Field(default="video", description="video, image, audio or mask.")
    size: int = Field(default=0, description="Bytes.")
    storage_options: dict[str, Any] = Field(default_factory=dict)


class InputRef(Model):
    """An upstream artifact by stage type and key (its path follows from those), and its kind."""

    stage: str
    key: str
    kind: str = ""


class StageCall(Model):
    """One stage of one run: the stage spec, its key, its inputs, its model, and the store."""

    pipeline: str
    stage: AnyStage
    key: str
    inputs: dict[str, InputRef] = Field(default_factory=dict)
    models: dict[str, ResolvedModel] = Field(default_factory=dict, description="Role -> model.")
    sources: dict[str, SourceRef] = Field(default_factory=dict, description="Source slot -> file.")
    seed: int = 0
    store: StoreSpec
    run_id: str
    clip: str = Field(default="", description="The clip's label in the UI (stem and URL hash), for card names.")
    position: int = Field(default=0, description="The stage's place in the pipeline's order, for card names.")

    @property
    def stage_type(self) -> str:
        return self.stage.stage

    @property
    def stage_id(self) -> str:
        return self.stage.id
