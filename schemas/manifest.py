"""The run manifest: what one run of a pipeline did, written as JSON next to its output video."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from reelflow.schemas.base import Model
from reelflow.schemas.pipeline import PipelineSpec

StageStatus = Literal["computed", "cached", "failed", "skipped"]


class StageRecord(Model):
    name: str = Field(description="The stage's id in the pipeline.")
    stage: str = Field(description="The stage type.")
    key: str = Field(description="The stage key.")
    status: StageStatus = Field(description="computed in this run, cached from an earlier one, failed, or skipped.")
    seconds: float = Field(description="Wall time from submission to completion in this run.")
    artifact: str | None = Field(default=None, description="URL of the stage's artifact.")
    error: str | None = Field(default=None, description="Why the stage failed or was skipped.")


class SourceRecord(Model):
    url: str
    key: str
    size: int


class RunManifest(Model):
    run_id: str
    pipeline: str
    status: Literal["completed", "failed"]
    started_at: float
    finished_at: float
    seconds: float
    spec: PipelineSpec
    input: SourceRecord = Field(description="The video.")
    sources: dict[str, SourceRecord] = Field(default_factory=dict, description="The other sources the stages read, by name.")
    store: str
    stages: list[StageRecord]
    outputs: dict[str, str] = Field(default_factory=dict, description="Output name -> URL (videos, the manifest).")
    metrics: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Metrics stage id -> mean values.")
