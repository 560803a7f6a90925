"""Stage declaration of ``estimate_depth``: per-frame inverse depth of a clip, for any method to read.

The stage predicts relative inverse depth (disparity: near is large) frame by frame, in batches at
the depth model's input size, and maps it to [0, 1] with one scale and shift for the whole clip, so
a pixel's depth does not flicker from frame to frame when the model's per-image scale drifts
(methods.md 4.2: Gen-1's structure is MiDaS depth of every frame). Per-frame normalisation is kept
for comparison. Two backends fill the ``depth`` role: DPT models in MiDaS's own checkpoint layout
over timm (family ``midas``), and transformers depth models (``DPTForDepthEstimation``, Depth
Anything V1/V2 through ``AutoModelForDepthEstimation``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from reelflow.schemas.base import Model, PositiveInt
from reelflow.schemas.kinds import Attrs, register_kind
from reelflow.schemas.registry import Method
from reelflow.schemas.stages import Role, StageSpec, register_stage

Normalisation = Literal["video", "frame"]
DEPTH = Role(
    families=("midas", "transformers"),
    description="a monocular depth model predicting relative inverse depth (MiDaS DPT, DPT, Depth Anything)",
    tiny="depth-anything",
)


class DepthMaps(Attrs):
    """Inverse depth per frame in [0, 1] (near is 1), how it was normalised, and the raw range it came from."""

    normalisation: Normalisation = Field(
        description="video: one scale and shift for the whole clip; frame: each frame's own min and max."
    )
    backend: str = Field(description="What predicted it, e.g. 'transformers:DepthAnythingForDepthEstimation'.")
    input_size: tuple[int, int] = Field(description="What the model saw of each frame, (height, width) in pixels.")
    raw_min: float = Field(description="Smallest raw inverse depth over the clip, in the model's own units.")
    raw_max: float = Field(description="Largest raw inverse depth over the clip, in the model's own units.")


register_kind(
    "depth",
    DepthMaps,
    "inverse depth per frame in [0, 1] at the frames' size, its raw values and each frame's timestamp",
)


class EstimateDepthParams(Model):
    """How frames are batched and sized for the depth model, and how its output is normalised."""

    batch_size: PositiveInt = Field(default=4, description="Frames per model call; bounds peak memory.")
    input_size: PositiveInt | None = Field(
        default=None,
        description="The square side the model is asked for instead of its own (its processor's size: 384 for "
        "DPT-Large, 518 for Depth Anything; MiDaS's native side). Models that keep the aspect ratio scale each frame "
        "by whichever of the two factors reaching it in height or in width is nearer 1 (DPT's rule); sides are then "
        "rounded to the model's multiple. None: the model's own.",
    )
    normalise: Normalisation = Field(
        default="video",
        description="video: one scale and shift for the whole clip, so depth does not flicker; frame: each frame "
        "mapped to [0, 1] on its own (for comparison: a frame's depth then moves with its own extremes).",
    )


@register_stage
class EstimateDepth(StageSpec):
    """Predict each frame's inverse depth in batches and store it in [0, 1] with each frame's timestamp."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"frames": ("video_frames", "frames")}
    produces: ClassVar[str] = "depth"
    roles: ClassVar[dict[str, Role]] = {"depth": DEPTH}

    stage: Literal["estimate_depth"] = "estimate_depth"
    params: EstimateDepthParams = Field(default_factory=EstimateDepthParams, description="Depth options.")


METHOD = Method(
    name="depth",
    description="Monocular depth of every frame (MiDaS through timm, or transformers depth models), for any method.",
    implementations=("reelflow.tasks.depth",),
    tiny={
        "dpt": "reelflow.core.tiny_depth:build_tiny_dpt",
        "depth-anything": "reelflow.core.tiny_depth:build_tiny_depth_anything",
        "midas": "reelflow.core.tiny_depth:build_tiny_midas",
        "midas-beit": "reelflow.core.tiny_depth:build_tiny_midas_beit",
    },
)
