"""Stage declarations of the Wan 2.x backbones (Wan 2.1/2.2 image-to-video, VACE): their causal 3D VAE, their
UMT5 prompts, flow-matching inversion, first-frame propagation (Videoshop's job) and structure + content editing
(Gen-1's job, on VACE).

``encode_latents`` (method ``wan``) encodes the clip with ``AutoencoderKLWan`` into normalised latents, window by
window: windows of ``window`` frames (``4k + 1``, the transformer's frame count: 81 for Wan 2.1) that share
``overlap`` frames, the last moved back to end at the clip's end, each encoded on its own (the VAE is causal: a
window's first latent frame stands for its first frame alone, which is what an image-to-video model conditions
on). Without ``window`` the whole clip is one window, meeting ``4k + 1`` frames by a stated policy (pad by
repeating the last frame, or refuse). ``decode_latents`` (``wan``) decodes every window, drops the padding and
cross-fades the frames windows share, so a Wan pipeline keeps its clip's frame count and every stage that compares
against the source lines up. To trim instead, decode ``4k + 1`` frames in the first place (``decode_video``'s
``num_frames``): trimming here would leave the edit shorter than the source it is measured against.

``embed_content`` (``wan_text``) embeds a prompt and its negative with UMT5; ``invert_latents`` (``flowmatch``)
climbs each window's latents up the checkpoint's flow-matching schedule to an edit's start, conditioned on the
window's own first frame, storing every step; ``denoise_latents`` (``wan-propagate``) generates every window back
conditioned on an edited first frame (the user's, then each previous window's output at the frame they share),
and ``denoise_latents`` (``vace``) edits every window under the clip's stored depth (at structure level ``t_s``)
with new content from the prompt and an optional reference image, each window after the first given the previous
window's output on the frames they share.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

import reelflow.schemas.depth  # noqa: F401  (the depth kind vace reads)
from reelflow.schemas.gen1 import EmbedTextParams, TextContent
from reelflow.schemas.base import Model, PositiveInt
from reelflow.schemas.kinds import Attrs, WindowInfo, register_kind
from reelflow.schemas.registry import Method
from reelflow.schemas.stages import Role, StageSpec, register_stage

WAN_VAE = Role(description="Wan's causal 3D VAE (AutoencoderKLWan: 16 channels, 4x in time, 8x in space)", tiny="wan-i2v")
WAN_TEXT = Role(description="the UMT5 text encoder and its tokenizer", tiny="wan-i2v")
WAN_I2V = Role(description="an image-to-video WanTransformer3DModel (with its flow-matching scheduler config, and the CLIP "
               "image encoder where it reads one)", tiny="wan-i2v")  # fmt: skip
WAN_VACE = Role(description="a WanVACETransformer3DModel (with its flow-matching scheduler config)", tiny="wan-vace")
FramePolicy = Literal["pad", "refuse"]
Solver = Literal["euler", "heun"]
Sampler = Literal["euler", "heun", "scheduler"]
Normalisation = Literal["per_frame", "per_channel", "none"]
WindowColour = Literal["boundary", "first_frame", "none"]


class WanLatents(Attrs):
    """Wan VAE latents ``(window, latent_frame, 16, H/8, W/8)``, normalised per channel, and the frames they stand for."""

    frames: int = Field(description="Source frames encoded (the padding not counted); decoding gives back this many.")
    padded: int = Field(description="Copies of the last frame appended to reach 4k+1 frames (one window only).")
    frame_policy: str = Field(description="How the clip met 4k+1 frames: pad or refuse.")
    latent_frames: int = Field(description="Latent frames a window: (window frames - 1) / 4 + 1.")
    windows: WindowInfo = Field(description="How the clip was cut into windows, each encoded on its own.")


register_kind("latents/wan", WanLatents, "Wan VAE latents, normalised per channel, with the frame count they stand for")


class WanEncodeParams(Model):
    frame_policy: FramePolicy = Field(
        default="pad",
        description="Wan takes 4k+1 frames: pad repeats the last frame (dropped again when decoding); refuse stops "
        "before any model loads unless the clip already has 4k+1 (to trim, decode 4k+1 frames). Only a clip that is "
        "one window needs it: longer clips are cut into full windows.",
    )
    window: PositiveInt | None = Field(
        default=None,
        description="Frames per window, 4k+1: the transformer's frame count (81 for Wan 2.1 and VACE); None: the "
        "whole clip is one window (a plain VAE round trip, or a clip the model takes at once).",
    )
    overlap: PositiveInt = Field(
        default=1,
        description="Frames neighbouring windows share; a propagation conditions each window on the previous one's "
        "output at the first of them.",
    )
    tiling: bool = Field(default=False, description="Encode in overlapping spatial tiles: less memory for large frames.")
    sample: bool = Field(default=False, description="Draw from the VAE posterior with the pipeline seed instead of its mode.")

    @field_validator("window")
    @classmethod
    def _four_k_plus_one(cls, value: int | None) -> int | None:
        if value is not None and (value - 1) % 4:
            below = (value - 1) // 4 * 4 + 1
            raise ValueError(f"window {value} is not 4k+1 frames, which Wan takes; use {below} or {below + 4}")
        return value

    @model_validator(mode="after")
    def _overlap_fits(self) -> WanEncodeParams:
        if self.window is not None and 2 * self.overlap > self.window:
            raise ValueError(f"overlap {self.overlap} is more than half the window of {self.window} frames; lower it")
        return self


@register_stage
class EncodeLatentsWan(StageSpec):
    """Encode the clip window by window with Wan's causal 3D VAE into normalised latents."""

    version: ClassVar[str] = "2"  # 2: windows
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"frames": ("video_frames", "frames")}
    produces: ClassVar[str] = "latents/wan"
    roles: ClassVar[dict[str, Role]] = {"vae": WAN_VAE}
    demo: ClassVar[dict[str, Any]] = {"window": 5}  # the demo's 8 frames in two windows

    stage: Literal["encode_latents"] = "encode_latents"
    method: Literal["wan"] = Field(default="wan", description="Wan's 3D VAE.")
    params: WanEncodeParams = Field(default_factory=WanEncodeParams, description="Encoding options.")

    def seeded(self) -> bool:
        return self.params.sample


class WanDecodeParams(Model):
    tiling: bool = Field(default=False, description="Decode in overlapping spatial tiles: less memory for large frames.")


@register_stage
class DecodeLatentsWan(StageSpec):
    """Decode Wan latents to RGB frames, as many as were encoded, windows cross-faded where they overlap."""

    version: ClassVar[str] = "2"  # 2: windows
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"latents": ("latents/wan",)}
    produces: ClassVar[str] = "frames"
    roles: ClassVar[dict[str, Role]] = {"vae": WAN_VAE}

    stage: Literal["decode_latents"] = "decode_latents"
    method: Literal["wan"] = Field(default="wan", description="Wan's 3D VAE.")
    params: WanDecodeParams = Field(default_factory=WanDecodeParams, description="Decoding options.")


class WanText(TextContent):
    """The prompts a Wan prompt embedding was made from."""

    max_sequence_length: int = Field(description="Tokens per prompt (states past a prompt's own are zeros).")


register_kind("content/wan_text", WanText, "UMT5 prompt states (negative, prompt) for a Wan transformer's cross-attention")


class FlowInversion(Attrs):
    """What a flow-matching inversion leaves for its edits: the schedule it climbed, how, and the windows."""

    num_steps: int = Field(description="Steps of the full schedule.")
    strength: float = Field(description="The edit's strength: generation starts where the inversion ended.")
    scheduler: str = Field(description="The scheduler class whose sigmas and timesteps were used.")
    sigmas: list[float] = Field(description="Each stored level's sigma: 0 (the clean latents), then each step's.")
    timesteps: list[float] = Field(description="The network's timestep at each level (0 at the clean latents).")
    solver: str = Field(description="euler or heun.")
    extrapolate: bool = Field(description="Whether each Euler step took the velocity on the line through x0.")
    normalisation: str = Field(description="How the latents were normalised before inverting.")
    guidance_scale: float = Field(description="Classifier-free guidance of the inversion (1: none).")
    frames: int = Field(description="Source frames the latents stand for (decoding gives back this many).")
    windows: WindowInfo = Field(description="How the clip was cut into windows (the latents').")


register_kind(
    "inversion/flowmatch",
    FlowInversion,
    "flow-matching inversion latents of every step, per window (Wan image-to-video), with the schedule's times",
)


class EmbedWanTextParams(EmbedTextParams):
    max_sequence_length: int = Field(default=512, ge=1, le=512, description="Tokens per prompt (Wan's 512).")


@register_stage
class EmbedWanText(StageSpec):
    """Embed a prompt and its negative with Wan's UMT5 text encoder, as Wan's pipelines do."""

    version: ClassVar[str] = "1"
    produces: ClassVar[str] = "content/wan_text"
    roles: ClassVar[dict[str, Role]] = {"text_encoder": WAN_TEXT}

    stage: Literal["embed_content"] = "embed_content"
    method: Literal["wan_text"] = Field(default="wan_text", description="Content from a prompt, for a Wan transformer.")
    params: EmbedWanTextParams = Field(description="The prompts.")


class FlowInvertParams(Model):
    """Flow-matching inversion on a Wan image-to-video transformer, each window conditioned on its own first frame."""

    num_steps: PositiveInt = Field(default=30, le=1000, description="Steps of the full schedule (Wan samples 50).")
    strength: float = Field(
        default=0.6, gt=0.0, le=1.0,
        description="Fraction of the schedule inverted and regenerated: 0.6 of 30 steps climbs 18 steps.",
    )  # fmt: skip
    solver: Solver = Field(default="euler", description="euler (one network call a step) or heun (two).")
    extrapolate: bool = Field(
        default=True,
        description="Videoshop's noise extrapolation for Euler steps: the velocity taken on the line through the "
        "clean latents at the step's upper sigma (3x to 32x lower round-trip error on an exact oracle, "
        "benchmarks/flowmatch.py); false: plain reverse Euler.",
    )
    normalisation: Normalisation = Field(
        default="none",
        description="Videoshop's latent normalisation before inverting: per frame over (C, h, w), per channel over "
        "(f, h, w), or none (Wan's latents are already normalised per channel by the VAE's statistics).",
    )
    guidance_scale: float = Field(default=1.0, ge=1.0, le=30.0, description="Classifier-free guidance (1: none).")
    check_reconstruction: bool = Field(
        default=False,
        description="Generate each window back with the inversion's own conditioning and store the per-latent-frame "
        "error (as many network calls again as the inversion).",
    )

    @model_validator(mode="after")
    def _check(self) -> FlowInvertParams:
        if self.extrapolate and self.solver != "euler":
            raise ValueError("extrapolate is Videoshop's proxy for the Euler step; with solver heun set extrapolate false")
        if int(self.num_steps * self.strength) < 1:
            raise ValueError(f"strength {self.strength} of {self.num_steps} steps inverts no step; raise either")
        return self


@register_stage
class InvertFlowmatch(StageSpec):
    """Invert each window's latents up the flow-matching schedule to the edit's start, storing every step."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {
        "latents": ("latents/wan",), "frames": ("video_frames",), "content": ("content/wan_text",),
    }  # fmt: skip
    produces: ClassVar[str] = "inversion/flowmatch"
    roles: ClassVar[dict[str, Role]] = {"transformer": WAN_I2V, "vae": WAN_VAE}
    same_model_slots: ClassVar[tuple[str, ...]] = ("latents", "content")
    demo: ClassVar[dict[str, Any]] = {"num_steps": 6}

    stage: Literal["invert_latents"] = "invert_latents"
    method: Literal["flowmatch"] = Field(default="flowmatch", description="Flow-matching inversion (Wan image-to-video).")
    params: FlowInvertParams = Field(default_factory=FlowInvertParams, description="Inversion options.")


class WanPropagateParams(Model):
    """Generation conditioned on the edited frame, and how windows are kept consistent."""

    guidance_scale: float = Field(default=5.0, ge=1.0, le=30.0, description="Classifier-free guidance (Wan I2V's 5).")
    guidance_scale_2: float | None = Field(
        default=None, ge=1.0, le=30.0,
        description="Guidance of Wan 2.2 A14B's low-noise expert (transformer_2); None: guidance_scale, as diffusers' "
        "pipelines default. Only for bundles of two experts.",
    )  # fmt: skip
    solver: Sampler = Field(
        default="euler",
        description="euler (one network call a step: the exact reverse of the inversion's steps), heun (two), or "
        "scheduler (the checkpoint's own multistep update, as diffusers' pipeline samples).",
    )
    rescale: bool = Field(
        default=False,
        description="Videoshop's latent rescaling: map each window's latents so its first latent frame has the "
        "conditioning frame's per-channel latent statistics.",
    )
    window_colour: WindowColour = Field(
        default="boundary",
        description="How windows after the first keep their colour: boundary maps each window per channel so its "
        "shared frames match the previous window's output on them (fading out by the frames it shares with the "
        "next); first_frame rescales every window's latents to the edited frame's statistics; none relies on the "
        "conditioning alone.",
    )
    tiling: bool = Field(default=False, description="Decode in overlapping spatial tiles: less memory for large frames.")


@register_stage
class DenoiseWanPropagate(StageSpec):
    """Generate every window from its inversion conditioned on an edited first frame, decode and stitch."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {
        "inversion": ("inversion/flowmatch",), "content": ("content/wan_text",), "frames": ("video_frames",),
    }  # fmt: skip
    produces: ClassVar[str] = "frames"
    roles: ClassVar[dict[str, Role]] = {"transformer": WAN_I2V, "vae": WAN_VAE}
    same_model_slots: ClassVar[tuple[str, ...]] = ("inversion", "content")
    reads: ClassVar[dict[str, str]] = {"image": "image"}
    demo_sources: ClassVar[dict[str, str]] = {"image": "reelflow.core.synthetic:write_edited_first_frame"}

    stage: Literal["denoise_latents"] = "denoise_latents"
    method: Literal["wan-propagate"] = Field(default="wan-propagate", description="Edited-first-frame propagation on Wan I2V.")
    params: WanPropagateParams = Field(default_factory=WanPropagateParams, description="Generation options.")


class VaceParams(Model):
    """Structure from the clip's depth, content from a prompt (and a reference image), on VACE."""

    num_steps: PositiveInt = Field(default=30, le=1000, description="Steps of the full schedule (VACE samples 50).")
    strength: float = Field(
        default=1.0, gt=0.0, le=1.0,
        description="How far the source latents are noised before denoising: 1 starts from noise (the structure and "
        "the content alone), lower keeps more of the source's appearance.",
    )  # fmt: skip
    guidance_scale: float = Field(default=5.0, ge=1.0, le=30.0, description="Content (classifier-free) guidance.")
    guidance_scale_2: float | None = Field(
        default=None, ge=1.0, le=30.0,
        description="Guidance of Wan 2.2 A14B's low-noise expert (transformer_2); None: guidance_scale, as diffusers' "
        "pipelines default. Only for bundles of two experts.",
    )  # fmt: skip
    t_s: int = Field(
        default=0, ge=0, le=10,
        description="Structure level: 0 follows the depth exactly; each level halves the finest depth detail kept "
        "(blur and 2x downsampling of the frame-sized depth), letting shapes change more.",
    )  # fmt: skip
    conditioning_scale: float = Field(default=1.0, ge=0.0, le=2.0, description="Weight of VACE's control layers.")
    solver: Sampler = Field(
        default="scheduler",
        description="scheduler (the checkpoint's own multistep update: UniPC on Wan's flow sigmas, step for step "
        "diffusers' WanVACEPipeline), euler or heun (one or two network calls a step).",
    )
    tiling: bool = Field(default=False, description="Decode in overlapping spatial tiles: less memory for large frames.")

    @model_validator(mode="after")
    def _takes_a_step(self) -> VaceParams:
        if int(self.num_steps * self.strength) < 1:
            raise ValueError(f"strength {self.strength} of {self.num_steps} steps takes no step; raise either")
        return self


@register_stage
class DenoiseVace(StageSpec):
    """Edit every window under the clip's depth (VACE's control video) with new content, decode and stitch."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {
        "latents": ("latents/wan",), "depth": ("depth",), "content": ("content/wan_text",), "frames": ("video_frames",),
    }  # fmt: skip
    produces: ClassVar[str] = "frames"
    roles: ClassVar[dict[str, Role]] = {"transformer": WAN_VACE, "vae": WAN_VAE}
    same_model_slots: ClassVar[tuple[str, ...]] = ("latents", "content")
    optional_reads: ClassVar[dict[str, str]] = {"reference": "image", "mask": "mask"}
    demo: ClassVar[dict[str, Any]] = {"num_steps": 4}

    stage: Literal["denoise_latents"] = "denoise_latents"
    method: Literal["vace"] = Field(default="vace", description="Gen-1 style structure + content editing on VACE.")
    params: VaceParams = Field(default_factory=VaceParams, description="The edit.")

    def seeded(self) -> bool:
        return True  # the starting noise


METHOD = Method(
    name="wan",
    description="Wan 2.x backbones: the 3D VAE, flow-matching inversion, first-frame propagation (I2V) and "
    "structure + content editing (VACE).",
    implementations=("reelflow.tasks.wan", "reelflow.tasks.wan_edit"),
    tiny={"wan-i2v": "reelflow.core.tiny_wan:build_tiny_wan_i2v", "wan-vace": "reelflow.core.tiny_wan:build_tiny_wan_vace",
          "wan2.2-i2v": "reelflow.core.tiny_wan:build_tiny_wan22_i2v"},
)
