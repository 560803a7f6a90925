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
    compute_seconds: float | None = Field(
        default=None, description="Seconds its body took when it was computed (in this run, or the run that made it)."
    )
    peak_memory: int | None = Field(default=None, description="Peak resident bytes of the worker while it was computed.")
    peak_gpu_memory: int | None = Field(default=None, description="Peak bytes torch allocated on the GPU, where there was one.")
    bytes: int | None = Field(default=None, description="Bytes of its artifact in the store: stored if computed, reused if cached.")
    artifact: str | None = Field(default=None, description="URL of the stage's artifact.")
    error: str | None = Field(default=None, description="Why the stage failed or was skipped.")


class SourceRecord(Model):
    url: str
    key: str
    size: int


class RunCost(Model):
    """What the run cost, over its stages."""

    computed_seconds: float = Field(description="Seconds the stages computed in this run took, summed.")
    reused_seconds: float = Field(description="Seconds the cached stages took when they were computed: what reuse saved.")
    stored_bytes: int = Field(description="Bytes of the artifacts this run computed.")
    reused_bytes: int = Field(description="Bytes of the cached artifacts it reused.")
    peak_memory: int | None = Field(default=None, description="The largest peak resident memory of a computed stage.")
    peak_gpu_memory: int | None = Field(default=None, description="The largest peak GPU memory of a computed stage.")

    @classmethod
    def of(cls, stages: list[StageRecord]) -> RunCost:
        computed = [s for s in stages if s.status == "computed"]
        cached = [s for s in stages if s.status == "cached"]
        peaks = [s.peak_memory for s in computed if s.peak_memory is not None]
        gpu = [s.peak_gpu_memory for s in computed if s.peak_gpu_memory is not None]
        return cls(
            computed_seconds=round(sum(s.compute_seconds or 0.0 for s in computed), 4),
            reused_seconds=round(sum(s.compute_seconds or 0.0 for s in cached), 4),
            stored_bytes=sum(s.bytes or 0 for s in computed),
            reused_bytes=sum(s.bytes or 0 for s in cached),
            peak_memory=max(peaks, default=None),
            peak_gpu_memory=max(gpu, default=None),
        )


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
    cost: RunCost | None = Field(default=None, description="Seconds, bytes and peak memory over the stages.")


COMPARISON_NAME = r"^[a-z0-9][a-z0-9_-]*$"


class ComparisonRow(Model):
    """One method on one clip: its metrics and what it cost."""

    method: str = Field(description="The pipeline's name (its label in the comparison).")
    clip: str
    status: Literal["completed", "failed"]
    seed: int
    models: dict[str, str] = Field(default_factory=dict, description="Role -> model id (@ the commit a hub revision resolved to).")
    frames: int | None = Field(default=None, description="Frames the pipeline worked on.")
    width: int | None = None
    height: int | None = None
    fps: str | None = None
    metrics: dict[str, float | None] = Field(
        default_factory=dict,
        description="Metric -> mean, None where it had no finite value (``stage.metric`` where an edit has several metrics stages).",
    )
    stage_seconds: float = Field(description="Seconds its stages took to compute, whichever edit or earlier run computed them.")
    computed_seconds: float = Field(description="Of those, the seconds computed for this row in this comparison.")
    peak_memory: int | None = Field(default=None, description="The largest peak resident memory of its stages.")
    peak_gpu_memory: int | None = None
    bytes: int = Field(description="Bytes of its intermediates in the store.")
    output: str | None = None
    report: str | None = None
    manifest: str | None = None
    error: str | None = None


class Comparison(Model):
    """Several methods on the same clips (``reelflow compare``)."""

    name: str = Field(pattern=COMPARISON_NAME, description="Names its files: <name>.csv, .json, .html.")
    methods: list[str]
    clips: list[str]
    store: str
    seconds: float = Field(description="Wall seconds of the edits.")
    stages_planned: int = Field(description="Stages over all edits.")
    stages_distinct: int = Field(description="Distinct stage keys among them: what had to exist once.")
    stage_seconds: float = Field(description="Sum of the rows' stage seconds: the edits' cost one by one.")
    computed_seconds: float = Field(description="Stage seconds computed in this comparison, each shared stage once.")
    better: dict[str, Literal["higher", "lower"]] = Field(default_factory=dict, description="Metric column -> which way is good.")
    rows: list[ComparisonRow]
    outputs: dict[str, str] = Field(default_factory=dict, description="csv, json and report URLs.")
