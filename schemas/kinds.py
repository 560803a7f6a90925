"""Artifact kinds: the typed outputs stages produce and read, and what each leaves in its attrs.

A kind is a name (``latents``, ``inversion/ddim-attention``, ``depth``, ...) plus the pydantic model
of the attrs a stage of that kind writes for the stages after it (step counts, timesteps, layers,
frame rate). The writer returns an instance of that model and the reader gets one back, so the
contract between two stages lives in one class, not in dict literals in two files. Stage slots
accept kinds, so wiring a FateZero edit to another method's inversion is a graph error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Self

from pydantic import Field

from reelflow.schemas.base import Model
from reelflow.schemas.errors import RegistryError


class WindowInfo(Model):
    """How a windowed stage cut the clip: windows of one length, neighbours sharing ``overlap`` frames."""

    length: int = Field(description="Frames per window (the model's frame count).")
    overlap: int = Field(description="Frames shared by neighbouring windows.")
    spans: list[tuple[int, int]] = Field(description="Each window's frames, [start, stop).")


class Attrs(Model):
    """Base of a kind's attrs: written into the artifact's group attrs, read back by the next stage.

    Extra keys in a group (provenance, timings, what a stage adds for people) are ignored on read.
    """

    @classmethod
    def read(cls, attrs: Mapping[str, Any]) -> Self:
        """The model from a group's attrs (``zarr.Group.attrs`` or a dict)."""
        return cls.model_validate({name: attrs[name] for name in cls.model_fields if name in attrs})


class NoAttrs(Attrs):
    """A kind whose readers need nothing from the attrs."""


@dataclass(frozen=True)
class ArtifactKind:
    name: str
    attrs: type[Attrs]
    description: str


KINDS: dict[str, ArtifactKind] = {}


def register_kind(name: str, attrs: type[Attrs] = NoAttrs, description: str = "") -> ArtifactKind:
    """Declare an artifact kind; a name registered twice with another attrs model is refused."""
    kind = ArtifactKind(name, attrs, description)
    known = KINDS.get(name)
    if known is not None and known.attrs is not attrs:
        raise RegistryError(f"artifact kind {name!r} is registered twice ({known.attrs.__qualname__}, {attrs.__qualname__})")
    KINDS[name] = kind
    return kind


def kind_attrs(kind: str) -> type[Attrs]:
    try:
        return KINDS[kind].attrs
    except KeyError:
        raise RegistryError(f"unknown artifact kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}") from None


class SourceVideo(Model):
    width: int
    height: int
    fps: str
    num_frames: int
    duration: float
    codec: str


class Resize(Model):
    scaled: tuple[int, int]
    output: tuple[int, int]
    fit: str


class VideoFrames(Attrs):
    """Frames decoded from a source video, with the audio of their span."""

    fps: str = Field(description="Frame rate of the selected frames, as a fraction 'num/den'.")
    start: float = Field(description="Time of the first selected frame, seconds.")
    end: float = Field(description="End of the selected span, seconds.")
    sample_rate: int | None = Field(default=None, description="Audio sample rate; None when the source has no audio.")
    source_video: SourceVideo
    resize: Resize


class Latents(Attrs):
    """VAE latents ``(F, C, H/s, W/s)``, scaled by the VAE's scaling factor."""


class EncodedVideo(Attrs):
    fps: str
    num_frames: int
    duration: float
    width: int
    height: int
    has_audio: bool
    media_type: str = "video/mp4"


class Metrics(Attrs):
    metrics: dict[str, float] = Field(description="Metric name -> mean over frames.")
    better: dict[str, Literal["higher", "lower"]] = Field(default_factory=dict, description="Metric name -> which way is good.")
    descriptions: dict[str, str] = Field(default_factory=dict, description="Metric name -> what it measures, for reports.")


register_kind("video_frames", VideoFrames, "frames decoded from the source video (uint8), their indices, its audio")
register_kind("frames", NoAttrs, "RGB frames (uint8) made by a stage")
register_kind("latents", Latents, "VAE latents")
register_kind("video", EncodedVideo, "an encoded video file, stored as bytes")
register_kind("metrics", Metrics, "per-frame metrics and their means")
