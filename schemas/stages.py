"""Stage declarations: each stage's params, the artifacts it reads, the artifact it writes.

A stage is declared once, here, as a pydantic model that is also the YAML shape of that stage in a
pipeline spec (tagged by its ``stage`` literal). The class variables are the declaration the DAG
engine reads: ``version`` (bumped when the numerics change, so stage keys change), ``slots`` (input
name -> artifact kinds it accepts), ``produces`` (the kind it writes) and ``needs_model``. The
runnable task for each stage lives in tasks/; nothing here holds weights or imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from reelflow.schemas.base import Model, NonNegativeFloat, PositiveInt, StageId

STAGE_TYPES: dict[str, type[StageSpec]] = {}


def register_stage(cls: type[StageSpec]) -> type[StageSpec]:
    """Add a stage class to the registry under its ``stage`` literal."""
    name = cls.model_fields["stage"].default
    if name in STAGE_TYPES:
        raise ValueError(f"stage {name!r} is registered twice")
    STAGE_TYPES[name] = cls
    return cls


class StageSpec(Model):
    """Fields every stage shares: its id in the pipeline, its wiring and its model."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {}
    produces: ClassVar[str] = ""
    needs_model: ClassVar[bool] = False
    reads_source: ClassVar[bool] = False
    same_model_slots: ClassVar[tuple[str, ...]] = ()

    stage: str
    id: StageId = Field(
        default="", description="Unique id of this stage in the pipeline; defaults to the stage type."
    )
    inputs: dict[str, StageId] = Field(
        default_factory=dict,
        description="Input slot -> id of the stage that produces it. A slot left out is wired to the one "
        "stage whose output fits it, if there is exactly one.",
    )
    model: str | None = Field(
        default=None,
        description="Name of an entry in the pipeline's `models`; defaults to the only model when there is one.",
    )
    each: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Run this stage once per entry, each entry's keys overriding `params` (e.g. one target "
        "prompt each); the copies are `<id>_0`, `<id>_1`, ... and every stage downstream is repeated per copy. "
        "Stages upstream run once: invert once, edit many.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_id(cls, data: object) -> object:
        if isinstance(data, dict) and not data.get("id") and data.get("stage"):
            return {**data, "id": data["stage"]}
        return data

    def seeded(self) -> bool:
        """True when the pipeline seed changes this stage's output (the seed then enters its key)."""
        return False

    def check_inputs(self, producers: Mapping[str, StageSpec]) -> None:
        """Raise ValueError when this stage cannot use what its wired producers will make."""


class DecodeVideoParams(Model):
    """Which frames to take from the source, and how to size them for the model."""

    start: NonNegativeFloat = Field(default=0.0, description="Start time in seconds.")
    num_frames: PositiveInt | None = Field(default=None, description="Frames to take; None takes all to the end.")
    stride: PositiveInt | None = Field(default=None, description="Take every n-th frame (exclusive with fps).")
    fps: float | None = Field(default=None, gt=0, description="Target frame rate (exclusive with stride).")
    width: PositiveInt | None = Field(default=None, description="Output width in pixels; None follows the source.")
    height: PositiveInt | None = Field(default=None, description="Output height in pixels; None follows the source.")
    fit: Literal["crop", "pad"] = Field(
        default="crop",
        description="Keep the aspect ratio by centre-cropping the overflow or padding with black.",
    )
    multiple: PositiveInt = Field(
        default=8, description="Output sides are rounded to this multiple (8 for a VAE, 64 for an SD UNet)."
    )

    @model_validator(mode="after")
    def _check(self) -> DecodeVideoParams:
        if self.stride is not None and self.fps is not None:
            raise ValueError(
                f"give either stride ({self.stride}) or fps ({self.fps}), not both: both set the frame step"
            )
        for side in ("width", "height"):
            value = getattr(self, side)
            if value is not None and value % self.multiple:
                low = max(self.multiple, value - value % self.multiple)
                raise ValueError(
                    f"{side}={value} is not a multiple of {self.multiple}; use {low} or {low + self.multiple}"
                )
        return self


@register_stage
class DecodeVideo(StageSpec):
    """Decode the selected frames and the audio of their span from the source video."""

    version: ClassVar[str] = "1"
    produces: ClassVar[str] = "video_frames"
    reads_source: ClassVar[bool] = True

    stage: Literal["decode_video"] = "decode_video"
    params: DecodeVideoParams = Field(default_factory=DecodeVideoParams, description="Frame selection and sizing.")


class EncodeLatentsParams(Model):
    chunk_size: PositiveInt = Field(default=8, description="Frames per VAE call; bounds peak memory.")
    sample: bool = Field(
        default=False,
        description="Draw latents from the VAE posterior with the pipeline seed instead of taking its mode.",
    )


@register_stage
class EncodeLatents(StageSpec):
    """Encode frames to VAE latents, scaled by the VAE's scaling factor."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"frames": ("video_frames", "frames")}
    produces: ClassVar[str] = "latents"
    needs_model: ClassVar[bool] = True

    stage: Literal["encode_latents"] = "encode_latents"
    params: EncodeLatentsParams = Field(default_factory=EncodeLatentsParams, description="VAE encoding options.")

    def seeded(self) -> bool:
        return self.params.sample


class DecodeLatentsParams(Model):
    chunk_size: PositiveInt = Field(default=8, description="Frames per VAE call; bounds peak memory.")


@register_stage
class DecodeLatents(StageSpec):
    """Decode latents back to RGB frames with the VAE."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"latents": ("latents",)}
    produces: ClassVar[str] = "frames"
    needs_model: ClassVar[bool] = True

    stage: Literal["decode_latents"] = "decode_latents"
    params: DecodeLatentsParams = Field(default_factory=DecodeLatentsParams, description="VAE decoding options.")


class EncodeVideoParams(Model):
    codec: Literal["libx264", "libx265"] = Field(default="libx264", description="Video encoder (H.264 or H.265).")
    crf: int = Field(default=18, ge=0, le=51, description="Constant rate factor: 0 lossless, 18 visually lossless, 51 worst.")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"] = (
        Field(default="medium", description="Encoder speed/size trade-off.")
    )
    audio: bool = Field(default=True, description="Mux the source's audio of the edited span back in, when it has one.")


@register_stage
class EncodeVideo(StageSpec):
    """Encode frames as an H.264 MP4 (yuv420p) at the source frame rate with the source audio."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {
        "frames": ("frames", "video_frames"),
        "source": ("video_frames",),
    }
    produces: ClassVar[str] = "video"

    stage: Literal["encode_video"] = "encode_video"
    params: EncodeVideoParams = Field(default_factory=EncodeVideoParams, description="Encoder options.")


MetricName = Literal["psnr", "ssim"]


class ComputeMetricsParams(Model):
    metrics: tuple[MetricName, ...] = Field(
        default=("psnr", "ssim"), min_length=1, description="Metrics to compute, per frame and as a mean."
    )


@register_stage
class ComputeMetrics(StageSpec):
    """Compare edited frames with the source frames: PSNR and SSIM per frame and their means."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {
        "source": ("video_frames",),
        "edited": ("frames", "video_frames"),
    }
    produces: ClassVar[str] = "metrics"

    stage: Literal["compute_metrics"] = "compute_metrics"
    params: ComputeMetricsParams = Field(default_factory=ComputeMetricsParams, description="Which metrics.")
