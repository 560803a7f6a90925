"""Stage declarations: each stage's params, the artifacts it reads, the artifact it writes.

A stage is declared once, as a pydantic model that is also the YAML shape of that stage in a
pipeline spec, tagged by its ``stage`` literal and, where a stage has several implementations, its
``method`` literal (``{stage: invert_latents, method: fatezero}``). The class variables are the
declaration the DAG engine reads:

- ``version``: bumped when the numerics change, so stage keys change;
- ``slots``: input name -> the artifact kinds it accepts (see :mod:`reelflow.schemas.kinds`);
- ``optional_slots``: inputs that may stay unwired (wired when given, or when exactly one stage fits and
  :meth:`StageSpec.wires` says the params want it);
- ``produces``: the kind it writes;
- ``roles``: the models it needs, by role (``unet``, ``vae``, ``image_encoder``, ``depth``, ...);
- ``optional_roles``: roles it fills only when the stage's ``models:`` names a model for them (an adapter), or
  as :meth:`StageSpec.fills` decides from the params (a backbone's parts);
- ``reads``: the named sources it reads (the video, an edited frame, an audio file, a mask), by kind;
- ``optional_reads``: sources it reads only when the pipeline declares one for the slot (a mask);
- ``exports``: what it adds to the run's outputs (a video file, the metrics table);
- ``same_model_slots``: inputs whose producer must use the same models (an edit and its inversion);
- ``demo``: params ``reelflow demo`` sets so the stage runs in seconds on a CPU with tiny models;
- ``demo_sources``: source slot -> ``module:function`` that writes the demo's file for it from the
  demo clip (``fn(clip, out)``), where a generic synthetic file would not do (an edited first frame).

The runnable task for each (stage, method) is registered under the same key in reelflow.tasks;
nothing here holds weights or imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from reelflow.schemas.base import Model, NonNegativeFloat, PositiveInt, StageId
from reelflow.schemas.errors import RegistryError
from reelflow.schemas.kinds import KINDS
from reelflow.schemas.registry import Method

STAGE_TYPES: dict[tuple[str, str | None], type[StageSpec]] = {}
SourceKind = Literal["video", "image", "audio", "mask"]
SOURCE_KINDS: tuple[str, ...] = ("video", "image", "audio", "mask")


def stage_tag(stage: str, method: str | None) -> str:
    """The tag of a (stage, method) in a spec's stage union and in messages: ``invert_latents:fatezero``."""
    return f"{stage}:{method}" if method else stage


def register_stage(cls: type[StageSpec]) -> type[StageSpec]:
    """Add a stage declaration to the registry under its (stage, method) key."""
    key = (cls.model_fields["stage"].default, cls.model_fields["method"].default)
    if key in STAGE_TYPES and STAGE_TYPES[key] is not cls:
        raise RegistryError(f"stage {stage_tag(*key)} is declared twice ({STAGE_TYPES[key].__module__}, {cls.__module__})")
    for kind in (cls.produces, *(k for kinds in cls.slots.values() for k in kinds)):
        if kind not in KINDS:
            raise RegistryError(f"stage {stage_tag(*key)} uses the artifact kind {kind!r}, which no method registers; "
                                f"register it with register_kind (known: {', '.join(sorted(KINDS))})")  # fmt: skip
    if set(cls.optional_roles) - set(cls.roles):
        raise RegistryError(f"stage {stage_tag(*key)} declares optional roles it does not have: "
                            f"{', '.join(sorted(set(cls.optional_roles) - set(cls.roles)))}")  # fmt: skip
    for slot, kind in {**cls.reads, **cls.optional_reads}.items():
        if kind not in SOURCE_KINDS:
            raise RegistryError(f"stage {stage_tag(*key)} reads source {slot!r} of kind {kind!r}; kinds: {', '.join(SOURCE_KINDS)}")
    STAGE_TYPES[key] = cls
    return cls


def methods_of(stage: str) -> list[str | None]:
    """The methods that implement ``stage`` (None for the untagged one)."""
    return [method for name, method in STAGE_TYPES if name == stage]


class Role(Model):
    """A model a stage needs, named by what it does there."""

    families: tuple[str, ...] = Field(default=("diffusers",), description="Model families that can fill the role.")
    description: str = Field(default="", description="What the stage uses it for.")
    tiny: str = Field(
        default="sd", description="The tiny model (a name `reelflow models tiny --kind` knows) that fills it in the demo."
    )


class Export(Model):
    """Something a stage adds to the run's outputs."""

    kind: Literal["file", "metrics"] = Field(description="file: an array's bytes as a file; metrics: the metrics attr.")
    array: str | None = Field(default=None, description="For files: the uint8 array holding the file's bytes.")
    suffix: str | None = Field(default=None, description="For files: the output file's extension, e.g. 'mp4'.")

    @model_validator(mode="after")
    def _file_needs_array_and_suffix(self) -> Export:
        if self.kind == "file" and not (self.array and self.suffix):
            raise ValueError("a file export names the array holding the file's bytes and the file's suffix")
        return self


class StageSpec(Model):
    """Fields every stage shares: its id in the pipeline, its wiring, its models and its sources."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {}
    optional_slots: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[str] = ""
    roles: ClassVar[dict[str, Role]] = {}
    optional_roles: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[dict[str, str]] = {}
    optional_reads: ClassVar[dict[str, str]] = {}
    exports: ClassVar[tuple[Export, ...]] = ()
    same_model_slots: ClassVar[tuple[str, ...]] = ()
    demo: ClassVar[dict[str, Any]] = {}
    demo_sources: ClassVar[dict[str, str]] = {}

    stage: str
    method: str | None = Field(default=None, description="Which implementation of the stage, when it has several.")
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
        description="Name of the entry in the pipeline's `models` used for every role not set in `models`; "
        "defaults to the only model when there is one.",
    )
    models: dict[str, str] = Field(
        default_factory=dict, description="Model role (unet, vae, image_encoder, ...) -> name of an entry in `models`."
    )
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="Source slot -> name of a source of the pipeline; a slot left out reads the source of its own name.",
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

    @property
    def tag(self) -> str:
        return stage_tag(self.stage, self.method)

    @property
    def needs_model(self) -> bool:
        return bool(self.roles)

    def seeded(self) -> bool:
        """True when the pipeline seed changes this stage's output (the seed then enters its key)."""
        return False

    def fills(self, role: str) -> bool:
        """Whether this stage, as configured, uses a model as ``role``: every role but an optional one, which only
        when its ``models:`` names a model for it (an adapter). A stage whose params choose its models (a backbone,
        a loss with a model of its own) overrides this."""
        return role not in self.optional_roles or role in self.models

    def wires(self, slot: str) -> bool:
        """Whether an optional input ``slot`` left out of ``inputs`` is wired to the one stage that fits it (default:
        yes). A stage whose params make the input meaningless says no."""
        return True

    def check_inputs(self, producers: Mapping[str, StageSpec]) -> None:
        """Raise ValueError when this stage cannot use what its wired producers will make."""

    def key_params(self) -> dict[str, Any]:
        """The params that enter the stage key: all of them, as JSON. A stage leaves out only a param that cannot
        change its output as wired (an adapter's weight without the adapter), so adding one keeps old keys."""
        return self.params.model_dump(mode="json")


SD_VAE = Role(families=("diffusers",), description="the VAE of the latent space")


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
    reads: ClassVar[dict[str, str]] = {"video": "video"}
    demo: ClassVar[dict[str, Any]] = {"num_frames": 8, "width": 96, "height": 64, "multiple": 8}

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
    roles: ClassVar[dict[str, Role]] = {"vae": SD_VAE}

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
    roles: ClassVar[dict[str, Role]] = {"vae": SD_VAE}

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
    exports: ClassVar[tuple[Export, ...]] = (Export(kind="file", array="mp4", suffix="mp4"),)

    stage: Literal["encode_video"] = "encode_video"
    params: EncodeVideoParams = Field(default_factory=EncodeVideoParams, description="Encoder options.")


METHOD = Method(
    name="core",
    description="The stages every pipeline shares: decode and encode video and latents.",
    implementations=("reelflow.tasks.video", "reelflow.tasks.vae"),
    presets="reelflow.deployments.presets",
    tiny={
        "sd": "reelflow.core.tiny:build_tiny_bundle",
        "clip-vision": "reelflow.core.tiny:build_tiny_clip_vision",
        "timm": "reelflow.core.tiny:build_tiny_timm",
        "torchvision-raft": "reelflow.core.tiny:build_tiny_raft",
    },
)
