"""The toy method's stages, declared with reelflow.methods only (no torch, no Prefect)."""

from __future__ import annotations

from typing import ClassVar, Literal

from reelflow.methods import (
    Attrs,
    Field,
    Method,
    Model,
    PositiveInt,
    StageSpec,
    declare_stage,
    register_kind,
)


class ToyInversion(Attrs):
    num_steps: int = Field(description="Steps taken.")


register_kind("inversion/toy", ToyInversion, "a toy step-wise 'inversion' of latents")


class TintParams(Model):
    strength: float = Field(default=0.5, ge=0.0, le=1.0, description="How far each frame moves toward the tint.")
    window: PositiveInt = Field(default=4, description="Frames per window.")
    overlap: int = Field(default=1, ge=0, description="Frames shared by neighbouring windows.")
    anchor: int | None = Field(default=0, ge=0, description="A frame every window also sees (None: none).")


@declare_stage
class TintFrames(StageSpec):
    """Tint every frame toward the reference image's mean colour, scaled by the anchor frame's brightness."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"frames": ("video_frames", "frames")}
    produces: ClassVar[str] = "frames"
    reads: ClassVar[dict[str, str]] = {"reference": "image"}

    stage: Literal["tint_frames"] = "tint_frames"
    params: TintParams = Field(default_factory=TintParams, description="Tint options.")


class ToyInvertParams(Model):
    num_steps: PositiveInt = Field(default=4, description="Steps.")
    decay: float = Field(default=0.9, gt=0.0, description="Each step multiplies the latents by this.")


@declare_stage
class ToyInvert(StageSpec):
    """A deterministic step-wise walk of the latents, stored step by step (a stand-in for an inversion)."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"latents": ("latents",)}
    produces: ClassVar[str] = "inversion/toy"

    stage: Literal["invert_latents"] = "invert_latents"
    method: Literal["toy"] = Field(default="toy", description="The toy inversion.")
    params: ToyInvertParams = Field(default_factory=ToyInvertParams, description="Toy inversion options.")


METHOD = Method(
    name="toy",
    description="A toy method package for reelflow's plugin tests.",
    implementations=("reelflow_toy.stages",),
    presets="reelflow_toy.presets",
    tiny={"toy-sd": "reelflow_toy.tiny:build"},
)
