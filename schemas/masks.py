"""Stage declaration of ``decode_mask``: the ``mask`` source as one binary mask per frame at the frames' size, for
any method to read (Soundini edits inside it; its background is kept outside).

The source is one image for every frame, a folder of images (one per frame, in name order) or a mask
video; at the source video's size (the frames' own resize plan is applied: the same scale, crop or
pad) or at the frames' size; 1 mask, one per selected frame, or one per source frame. Its count,
size and black-and-white-ness are checked before any model loads (:mod:`reelflow.core.masks`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from reelflow.schemas.base import Model
from reelflow.schemas.kinds import Attrs, register_kind
from reelflow.schemas.registry import Method
from reelflow.schemas.stages import StageSpec, register_stage


class MaskFrames(Attrs):
    """Where the masks came from and how they were made binary."""

    form: Literal["image", "sequence", "video"] = Field(description="One image, a folder of images, or a video.")
    count: int = Field(description="Masks the source holds.")
    threshold: float = Field(description="Mask values at or above it are inside (white: the region to edit).")
    source_size: tuple[int, int] = Field(description="The masks' size as given, (width, height).")
    resized: bool = Field(description="True: given at the video's size and sized with the frames' own plan.")


register_kind("masks", MaskFrames, "a binary region mask per frame (True: the region to edit) at the frames' size")


class DecodeMaskParams(Model):
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="Values at or above it (in [0, 1]) are inside.")


@register_stage
class DecodeMask(StageSpec):
    """Read the mask source as one binary mask per frame, sized with the frames."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"frames": ("video_frames",)}
    produces: ClassVar[str] = "masks"
    reads: ClassVar[dict[str, str]] = {"mask": "mask"}
    demo: ClassVar[dict[str, Any]] = {}

    stage: Literal["decode_mask"] = "decode_mask"
    params: DecodeMaskParams = Field(default_factory=DecodeMaskParams, description="Binarisation.")


METHOD = Method(
    name="masks",
    description="Region masks per frame from one image, an image sequence or a mask video, for any method.",
    implementations=("reelflow.tasks.masks",),
)
