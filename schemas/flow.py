"""Stage declaration of ``estimate_flow``: dense optical flow between neighbouring frames, both ways, with
occlusion, for any method or metric to read (Soundini's flow loss, warp errors).

Method ``raft`` runs torchvision's RAFT (``raft_large`` or ``raft_small``, weights from a file:
family ``torchvision``); method ``farneback`` runs OpenCV's dense Farneback flow, which needs no
weights. Both store ``forward (F-1, 2, H, W)`` (frame ``i`` to ``i+1``) and ``backward`` (``i+1``
to ``i``) in pixels at the frames' size, and ``occluded_forward`` / ``occluded_backward`` ``(F-1, H,
W)`` from forward-backward consistency (Sundaram et al. 2010): a pixel whose flow the other
direction does not undo, or that leaves the frame.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from reelflow.schemas.base import Model, PositiveInt
from reelflow.schemas.kinds import Attrs, register_kind
from reelflow.schemas.registry import Method
from reelflow.schemas.stages import Role, StageSpec, register_stage

FLOW = Role(families=("torchvision",), description="RAFT from torchvision (raft_large, raft_small)", tiny="torchvision-raft")
FRAMES = {"frames": ("video_frames", "frames")}


class FlowFields(Attrs):
    """What estimated the flow, and how occlusion was told."""

    backend: str = Field(description="What estimated it, e.g. 'torchvision:raft_large' or 'opencv:farneback'.")
    consistency: tuple[float, float] = Field(
        description="Occluded where |f + b(p+f)|^2 > a (|f|^2 + |b(p+f)|^2) + b: (a, b)."
    )


register_kind(
    "flow",
    FlowFields,
    "optical flow between neighbouring frames both ways, in pixels, with occlusion from forward-backward consistency",
)


class RaftParams(Model):
    batch_size: PositiveInt = Field(default=4, description="Frame pairs per model call (each run both ways); bounds memory.")
    num_flow_updates: PositiveInt = Field(
        default=12, le=64, description="RAFT's recurrent refinements (torchvision's default 12; the Soundini prototype used 20)."
    )


class FarnebackParams(Model):
    batch_size: PositiveInt = Field(default=8, description="Frame pairs per chunk written.")
    pyr_scale: float = Field(default=0.5, gt=0.0, lt=1.0, description="Scale between pyramid levels.")
    levels: PositiveInt = Field(default=3, le=10, description="Pyramid levels.")
    winsize: PositiveInt = Field(default=15, description="Averaging window; larger is smoother and more robust.")
    iterations: PositiveInt = Field(default=3, description="Iterations per pyramid level.")
    poly_n: Literal[5, 7] = Field(default=5, description="Neighbourhood of the polynomial expansion.")
    poly_sigma: float = Field(default=1.2, gt=0.0, description="Gaussian sigma of the expansion (1.1 for 5, 1.5 for 7).")


class _EstimateFlow(StageSpec):
    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = FRAMES
    produces: ClassVar[str] = "flow"
    stage: Literal["estimate_flow"] = "estimate_flow"

    def key_params(self) -> dict[str, Any]:
        return {k: v for k, v in super().key_params().items() if k != "batch_size"}  # pairs per call: same flow


@register_stage
class EstimateFlowRaft(_EstimateFlow):
    """Optical flow of every neighbouring frame pair, both ways, with RAFT; occlusion from their consistency."""

    roles: ClassVar[dict[str, Role]] = {"flow": FLOW}
    method: Literal["raft"] = Field(default="raft", description="RAFT (torchvision).")
    params: RaftParams = Field(default_factory=RaftParams, description="RAFT options.")


@register_stage
class EstimateFlowFarneback(_EstimateFlow):
    """Optical flow of every neighbouring frame pair, both ways, with OpenCV's Farneback (no model weights)."""

    method: Literal["farneback"] = Field(default="farneback", description="OpenCV dense Farneback flow.")
    params: FarnebackParams = Field(default_factory=FarnebackParams, description="Farneback options.")


METHOD = Method(
    name="flow",
    description="Optical flow between neighbouring frames (RAFT, or OpenCV Farneback), with occlusion, for any method.",
    implementations=("reelflow.tasks.flow",),
)
