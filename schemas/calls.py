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
    """A model with its dtype settled and its fingerprint taken (no weights loaded)."""

    id: str
    revision: str | None = None
    dtype: DType
    fingerprint: str


class SourceRef(Model):
    """The source video a pipeline reads, identified by the hash of its bytes."""

    url: str
    key: str = Field(description="sha256 over the file's size and bytes.")
    storage_options: dict[str, Any] = Field(default_factory=dict)


class InputRef(Model):
    """An upstream artifact by stage type and key (its path follows from those)."""

    stage: str
    key: str


class StageCall(Model):
    """One stage of one run: the stage spec, its key, its inputs, its model, and the store."""

    pipeline: str
    stage: AnyStage
    key: str
    inputs: dict[str, InputRef] = Field(default_factory=dict)
    model: ResolvedModel | None = None
    source: SourceRef | None = None
    seed: int = 0
    store: StoreSpec
    run_id: str

    @property
    def stage_type(self) -> str:
        return self.stage.stage

    @property
    def stage_id(self) -> str:
        return self.stage.id
