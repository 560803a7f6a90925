"""Stage declarations of a zero-shot Gen-1 (Esser et al. 2023, "Structure and Content-Guided Video
Synthesis with Diffusion Models"): a clip's structure (depth, at a structure level ``t_s``) with new
content, smoothed in time by temporal guidance (``omega_t``).

``embed_content`` embeds the content: a prompt (method ``text``) or, as Gen-1 does, a reference
image's CLIP embedding, for an image-variation UNet (method ``reference``) or for an SD 1.5 UNet
through an IP-Adapter (method ``ip_adapter``, with a prompt beside it; the edit then names the same
adapter in its optional ``ip_adapter`` role); ``denoise_latents`` (method ``gen1``:
depth concatenated to the latents of a depth UNet such as stable-diffusion-2-depth; method
``gen1_controlnet``: a depth ControlNet beside an SD 1.5 UNet) edits the clip's latents from the
stored depth (``estimate_depth``), so sweeping ``t_s`` or ``omega_t`` (``each:``) never reruns depth.
Edits start from the source latents noised to their strength (SDEdit) or, when an ``invert_latents``
stage of the same method is in the pipeline, from its stored DDIM inversion, shared by every edit.
With a ``mask`` source (white: edit) only the masked region changes; outside it every step keeps the
source's own trajectory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

import reelflow.schemas.depth  # noqa: F401  (the depth kind these stages read)
from reelflow.schemas.base import Model, PositiveInt
from reelflow.schemas.fatezero import FrameKey
from reelflow.schemas.kinds import Attrs, register_kind
from reelflow.schemas.registry import Method
from reelflow.schemas.stages import Role, StageSpec, register_stage

TEXT_ENCODER = Role(description="the CLIP text encoder and its tokenizer")
DEPTH_UNET = Role(description="a UNet taking depth as a fifth input channel (with its scheduler config)", tiny="sd-depth")
UNET = Role(description="the denoising UNet (with its scheduler config)")
CONTROLNET = Role(description="a depth ControlNet for the UNet", tiny="sd-controlnet")
IMAGE_ENCODER = Role(description="the CLIP image encoder with projection (and its image processor)",
                     tiny="sd-image-variations")
IP_ADAPTER = Role(families=("ip_adapter",), description="an IP-Adapter (its weights and its CLIP image encoder)",
                  tiny="ip-adapter")


class TextContent(Attrs):
    """The prompts a content embedding was made from."""

    prompt: str = Field(description="What the edited video should show.")
    negative_prompt: str = Field(description="The unconditional prompt of classifier-free guidance.")


register_kind("content/text", TextContent, "prompt embeddings (unconditional, conditional) for cross-attention")


class Gen1Inversion(Attrs):
    """What a Gen-1 inversion leaves for its edits: the schedule it climbed and the structure it used."""

    num_steps: int = Field(description="DDIM steps of the full schedule.")
    strength: float = Field(description="The edit's strength: the inversion climbs to where its denoising starts.")
    timesteps: list[int] = Field(description="The timesteps climbed, ascending.")
    t_s: int = Field(description="The structure level the inversion saw.")


register_kind("inversion/gen1", Gen1Inversion, "DDIM inversion latents of every level under the clip's depth (Gen-1)")


class ReferenceContent(Attrs):
    """The reference image a content embedding was made from."""

    image_size: tuple[int, int] = Field(description="The reference image as given, (width, height).")
    embedding_dim: int = Field(description="Width of the CLIP image embedding.")


register_kind(
    "content/reference",
    ReferenceContent,
    "a reference image's CLIP image embedding as one cross-attention token (unconditional: zeros)",
)


class IPAdapterContent(TextContent, ReferenceContent):
    """The prompts and the reference image an IP-Adapter content embedding was made from."""


register_kind("content/ip_adapter", IPAdapterContent, "prompt embeddings and a reference image's CLIP image embedding "
              "for an IP-Adapter (unconditional: zeros)")  # fmt: skip


class EmbedTextParams(Model):
    prompt: str = Field(min_length=1, description="The content: what the edited video should show.")
    negative_prompt: str = Field(default="", description="The unconditional prompt of classifier-free guidance.")


@register_stage
class EmbedText(StageSpec):
    """Encode the content prompt (and the negative one, and the empty one) with the text encoder."""

    version: ClassVar[str] = "2"  # 2: the empty prompt's embedding too
    produces: ClassVar[str] = "content/text"
    roles: ClassVar[dict[str, Role]] = {"text_encoder": TEXT_ENCODER}

    stage: Literal["embed_content"] = "embed_content"
    method: Literal["text"] = Field(default="text", description="Content from a prompt.")
    params: EmbedTextParams = Field(description="The content prompt.")


class EmbedReferenceParams(Model):
    """No options: the image encoder's own processor sizes and normalises the reference."""


@register_stage
class EmbedReference(StageSpec):
    """Embed the reference image with CLIP: Gen-1's content pathway, for a UNet that cross-attends to image
    embeddings (an image-variation UNet such as lambdalabs/sd-image-variations-diffusers)."""

    version: ClassVar[str] = "1"
    produces: ClassVar[str] = "content/reference"
    roles: ClassVar[dict[str, Role]] = {"image_encoder": IMAGE_ENCODER}
    reads: ClassVar[dict[str, str]] = {"reference": "image"}

    stage: Literal["embed_content"] = "embed_content"
    method: Literal["reference"] = Field(default="reference", description="Content from a reference image.")
    params: EmbedReferenceParams = Field(default_factory=EmbedReferenceParams, description="None.")


class EmbedIPAdapterParams(EmbedTextParams):
    prompt: str = Field(default="", description="Text beside the reference image; empty lets the image alone set the content.")


@register_stage
class EmbedIPAdapter(StageSpec):
    """Embed the prompts with the text encoder and the reference image with the IP-Adapter's CLIP image encoder:
    content for an SD 1.5 UNet through an IP-Adapter (the edit names the same adapter)."""

    version: ClassVar[str] = "1"
    produces: ClassVar[str] = "content/ip_adapter"
    roles: ClassVar[dict[str, Role]] = {"text_encoder": TEXT_ENCODER, "ip_adapter": IP_ADAPTER}
    reads: ClassVar[dict[str, str]] = {"reference": "image"}

    stage: Literal["embed_content"] = "embed_content"
    method: Literal["ip_adapter"] = Field(default="ip_adapter", description="Content from a reference image and a prompt.")
    params: EmbedIPAdapterParams = Field(default_factory=EmbedIPAdapterParams, description="The prompts.")


CONTENT = ("content/text", "content/reference", "content/ip_adapter")


class Gen1Params(Model):
    """Structure, content and temporal guidance of one edit."""

    num_steps: PositiveInt = Field(default=50, le=1000, description="DDIM steps of the full schedule.")
    strength: float = Field(
        default=0.8, gt=0.0, le=1.0,
        description="How far the source latents are noised before denoising (SDEdit): 1 starts from noise, "
        "lower keeps more of the source's appearance.",
    )  # fmt: skip
    omega: float = Field(default=7.5, ge=1.0, le=30.0, description="Content (classifier-free) guidance.")
    omega_t: float = Field(
        default=1.0, ge=0.0, le=10.0,
        description="Temporal guidance: 0 edits frame by frame, 1 is the cross-frame (video) prediction, above 1 "
        "smooths more. Each step costs three UNet passes (two when 0).",
    )  # fmt: skip
    t_s: int = Field(
        default=0, ge=0, le=10,
        description="Structure level: 0 follows the depth exactly; each level halves the finest depth detail kept "
        "(blur and 2x downsampling) where the UNet reads it (the latent grid for a depth UNet, the frame for a "
        "ControlNet), letting shapes change more.",
    )  # fmt: skip
    frame_keys: tuple[FrameKey, ...] = Field(
        default=("self", "first"),
        description="What video-mode self-attention reads besides each frame's own tokens; 'first' is the anchor "
        "frame every window shares.",
    )
    window: PositiveInt = Field(default=16, description="Frames per window; longer clips go window by window.")
    overlap: int = Field(default=2, ge=0, description="Frames neighbouring windows share (cross-faded).")
    conditioning_scale: float = Field(default=1.0, ge=0.0, le=2.0, description="The depth ControlNet's strength.")
    ip_adapter_scale: float = Field(
        default=1.0, ge=0.0, le=2.0,
        description="How strongly an IP-Adapter's reference image steers the content (its image tokens' weight in "
        "cross-attention); only with content from embed_content:ip_adapter.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> Gen1Params:
        if 2 * self.overlap > self.window:
            raise ValueError(f"overlap {self.overlap} is more than half the window of {self.window} frames; lower it")
        _check_takes_a_step(self.num_steps, self.strength)
        if "first" not in self.frame_keys or any(k in ("mid", "last") or (isinstance(k, int) and k > 0) for k in self.frame_keys):
            raise ValueError(f"frame_keys {list(self.frame_keys)} must include 'first' (the anchor every window shares) "
                             "and may not read later frames ('mid', 'last', positive offsets): the anchor would then "
                             "be edited differently in each window")  # fmt: skip
        return self


def _check_takes_a_step(num_steps: int, strength: float) -> None:
    if int(num_steps * strength) < 1:
        raise ValueError(f"strength {strength} of {num_steps} steps takes no step; raise either")


class Gen1InvertParams(Model):
    """DDIM inversion under the clip's depth, frame by frame and without content, up to the edits' start."""

    num_steps: PositiveInt = Field(default=50, le=1000, description="DDIM steps of the full schedule; the edits' own.")
    strength: float = Field(default=0.8, gt=0.0, le=1.0, description="The edits' strength: how far up to invert.")
    t_s: int = Field(default=0, ge=0, le=10, description="Structure level of the depth the inversion sees.")
    conditioning_scale: float = Field(default=1.0, ge=0.0, le=2.0, description="The depth ControlNet's strength.")
    chunk_size: PositiveInt = Field(default=8, description="Frames per UNet call (frames are inverted alone).")

    @model_validator(mode="after")
    def _takes_a_step(self) -> Gen1InvertParams:
        _check_takes_a_step(self.num_steps, self.strength)
        return self


class _Gen1Invert(StageSpec):
    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"latents": ("latents",), "depth": ("depth",), "content": CONTENT}
    produces: ClassVar[str] = "inversion/gen1"
    demo: ClassVar[dict[str, Any]] = {"num_steps": 6}

    stage: Literal["invert_latents"] = "invert_latents"
    params: Gen1InvertParams = Field(default_factory=Gen1InvertParams, description="Inversion options.")


@register_stage
class InvertGen1(_Gen1Invert):
    """Invert the clip's latents under its depth (concatenated to a depth UNet's input), every level stored."""

    roles: ClassVar[dict[str, Role]] = {"unet": DEPTH_UNET}
    method: Literal["gen1"] = Field(default="gen1", description="DDIM inversion with a depth UNet.")


@register_stage
class InvertGen1ControlNet(_Gen1Invert):
    """Invert the clip's latents under its depth (through a depth ControlNet), every level stored."""

    roles: ClassVar[dict[str, Role]] = {"unet": UNET, "controlnet": CONTROLNET}
    method: Literal["gen1_controlnet"] = Field(default="gen1_controlnet", description="DDIM inversion with a depth ControlNet.")


class _Gen1(StageSpec):
    # 2: windows kept whole (1 trimmed the anchor twice), the clip's depth range mapped to [-1, 1], the clean
    # source after the last blended step, inversion on the empty prompt. 3: t_s on the latent grid for a depth UNet.
    # 4: the inversion is a stage of its own (the optional `inversion` input) instead of `start: inversion`.
    version: ClassVar[str] = "4"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {
        "latents": ("latents",), "depth": ("depth",), "content": CONTENT, "inversion": ("inversion/gen1",),
    }  # fmt: skip
    optional_slots: ClassVar[tuple[str, ...]] = ("inversion",)
    same_model_slots: ClassVar[tuple[str, ...]] = ("inversion", "content")
    produces: ClassVar[str] = "latents"
    optional_reads: ClassVar[dict[str, str]] = {"mask": "mask"}
    demo: ClassVar[dict[str, Any]] = {"num_steps": 6, "window": 4, "overlap": 1}

    stage: Literal["denoise_latents"] = "denoise_latents"
    params: Gen1Params = Field(default_factory=Gen1Params, description="The edit.")

    def seeded(self) -> bool:
        return True  # the SDEdit noise

    def key_params(self) -> dict[str, Any]:
        params = super().key_params()
        if "ip_adapter" not in self.models:
            del params["ip_adapter_scale"]  # inert without an adapter (refused unless default), so older keys hold
        return params

    def check_inputs(self, producers: Mapping[str, StageSpec]) -> None:
        content = producers.get("content")
        adapted = content is not None and content.produces == "content/ip_adapter"
        if adapted and "ip_adapter" not in self.roles:
            raise ValueError(f"its content {content.id!r} is for an IP-Adapter, which method {self.method} does not take "
                             "(no IP-Adapter is published for its UNet); use method gen1_controlnet on SD 1.5, or "
                             "content from embed_content method text")  # fmt: skip
        if adapted and "ip_adapter" not in self.models:
            raise ValueError(f"its content {content.id!r} is for an IP-Adapter; name the same adapter here with "
                             f"`models: {{ip_adapter: {content.models.get('ip_adapter', '...')}}}`")  # fmt: skip
        if not adapted and "ip_adapter" in self.models:
            raise ValueError("it names an ip_adapter but its content is not an IP-Adapter's; embed the reference with "
                             "`embed_content` method ip_adapter, or leave the ip_adapter role out")  # fmt: skip
        if not adapted and self.params.ip_adapter_scale != Gen1Params.model_fields["ip_adapter_scale"].default:
            fix = " or give it content from embed_content method ip_adapter" if "ip_adapter" in self.roles else ""
            raise ValueError(f"ip_adapter_scale {self.params.ip_adapter_scale} weighs an IP-Adapter's image tokens, but "
                             f"this edit has none; leave it out{fix}")  # fmt: skip
        inversion = producers.get("inversion")
        if inversion is None:
            return
        for name in ("num_steps", "strength"):
            if getattr(inversion.params, name) != getattr(self.params, name):
                raise ValueError(f"it starts from {inversion.id!r}, inverted with {name} {getattr(inversion.params, name)}, "
                                 f"but edits with {getattr(self.params, name)}; set both to the same")  # fmt: skip


@register_stage
class DenoiseGen1(_Gen1):
    """Edit the clip's latents under its depth (concatenated to the latents) with new content."""

    roles: ClassVar[dict[str, Role]] = {"unet": DEPTH_UNET}
    method: Literal["gen1"] = Field(default="gen1", description="Gen-1 with a depth UNet (depth as an input channel).")


@register_stage
class DenoiseGen1ControlNet(_Gen1):
    """Edit the clip's latents under its depth (through a depth ControlNet) with new content."""

    roles: ClassVar[dict[str, Role]] = {"unet": UNET, "controlnet": CONTROLNET, "ip_adapter": IP_ADAPTER}
    optional_roles: ClassVar[tuple[str, ...]] = ("ip_adapter",)  # content from a reference image, on SD 1.5
    method: Literal["gen1_controlnet"] = Field(default="gen1_controlnet", description="Gen-1 with a depth ControlNet.")


METHOD = Method(
    name="gen1",
    description="Gen-1 style editing (Esser et al. 2023): depth structure, prompt content, temporal guidance.",
    implementations=("reelflow.tasks.gen1",),
    tiny={
        "sd-depth": "reelflow.core.tiny_gen1:build_tiny_sd_depth",
        "sd-controlnet": "reelflow.core.tiny_gen1:build_tiny_controlnet",
        "sd-image-variations": "reelflow.core.tiny_gen1:build_tiny_image_variations",
        "ip-adapter": "reelflow.core.tiny_gen1:build_tiny_ip_adapter",
    },
)
