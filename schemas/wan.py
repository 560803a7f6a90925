"""Stage declarations of the Wan 2.x backbones (Wan 2.1/2.2 image-to-video, VACE): their causal 3D VAE.

``encode_latents`` (method ``wan``) encodes the clip with ``AutoencoderKLWan`` into normalised latents of
``(F - 1) / 4 + 1`` latent frames, after meeting Wan's ``4k + 1`` frames by a stated policy (pad by repeating
the last frame, or refuse); ``decode_latents`` (``wan``) decodes them and gives back exactly the frames that
were encoded (padding dropped), so a Wan pipeline keeps its clip's frame count and every stage that compares
against the source (metrics, the audio of ``encode_video``) lines up. To trim instead, decode ``4k + 1``
frames in the first place (``decode_video``'s ``num_frames``): trimming here would leave the edit shorter than
the source it is measured against. Both run the VAE over
the whole clip in one causal pass (it keeps a cache and takes four frames at a time, so memory grows with
the output, not with the model's activations), with spatial tiles as an option for large frames.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from reelflow.schemas.base import Model
from reelflow.schemas.kinds import Attrs, register_kind
from reelflow.schemas.registry import Method
from reelflow.schemas.stages import Role, StageSpec, register_stage

WAN_VAE = Role(description="Wan's causal 3D VAE (AutoencoderKLWan: 16 channels, 4x in time, 8x in space)", tiny="wan-i2v")
FramePolicy = Literal["pad", "refuse"]


class WanLatents(Attrs):
    """Wan VAE latents ``(latent_frame, 16, H/8, W/8)``, normalised per channel, and the frames they stand for."""

    frames: int = Field(description="Source frames encoded (the padding not counted); decoding gives back this many.")
    padded: int = Field(description="Copies of the last frame appended to reach 4k+1 frames.")
    frame_policy: str = Field(description="How the clip met 4k+1 frames: pad or refuse.")
    latent_frames: int = Field(description="(frames + padded - 1) / 4 + 1.")


register_kind("latents/wan", WanLatents, "Wan VAE latents, normalised per channel, with the frame count they stand for")


class WanEncodeParams(Model):
    frame_policy: FramePolicy = Field(
        default="pad",
        description="Wan takes 4k+1 frames: pad repeats the last frame (dropped again when decoding); refuse stops "
        "before any model loads unless the clip already has 4k+1 (to trim, decode 4k+1 frames).",
    )
    tiling: bool = Field(default=False, description="Encode in overlapping spatial tiles: less memory for large frames.")
    sample: bool = Field(default=False, description="Draw from the VAE posterior with the pipeline seed instead of its mode.")


@register_stage
class EncodeLatentsWan(StageSpec):
    """Encode the clip with Wan's causal 3D VAE into normalised latents."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"frames": ("video_frames", "frames")}
    produces: ClassVar[str] = "latents/wan"
    roles: ClassVar[dict[str, Role]] = {"vae": WAN_VAE}

    stage: Literal["encode_latents"] = "encode_latents"
    method: Literal["wan"] = Field(default="wan", description="Wan's 3D VAE.")
    params: WanEncodeParams = Field(default_factory=WanEncodeParams, description="Encoding options.")

    def seeded(self) -> bool:
        return self.params.sample


class WanDecodeParams(Model):
    tiling: bool = Field(default=False, description="Decode in overlapping spatial tiles: less memory for large frames.")


@register_stage
class DecodeLatentsWan(StageSpec):
    """Decode Wan latents to RGB frames, as many as were encoded."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"latents": ("latents/wan",)}
    produces: ClassVar[str] = "frames"
    roles: ClassVar[dict[str, Role]] = {"vae": WAN_VAE}

    stage: Literal["decode_latents"] = "decode_latents"
    method: Literal["wan"] = Field(default="wan", description="Wan's 3D VAE.")
    params: WanDecodeParams = Field(default_factory=WanDecodeParams, description="Decoding options.")


METHOD = Method(
    name="wan",
    description="Wan 2.x backbones (image-to-video, VACE): their causal 3D VAE.",
    implementations=("reelflow.tasks.wan",),
    tiny={"wan-i2v": "reelflow.core.tiny_wan:build_tiny_wan_i2v", "wan-vace": "reelflow.core.tiny_wan:build_tiny_wan_vace"},
)
