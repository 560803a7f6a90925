"""Stage declarations of FateZero (Qi et al. 2023, "FateZero: Fusing Attentions for Zero-shot
Text-based Video Editing"): DDIM inversion that records attention, and attention-fusion editing.

Defaults follow the released configs (methods.md 1.10): 50 steps, guidance 7.5, the middle frame as
the cross-frame key, cross-frame attention only on layers of 640 channels or more, maps recorded
for layers whose query length is at most 1024 (32x32 and below at 512 px).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from reelflow.schemas.base import Model, PositiveInt
from reelflow.schemas.kinds import Attrs, register_kind
from reelflow.schemas.registry import Method
from reelflow.schemas.stages import Role, StageSpec, register_stage

FrameKey = Literal["self", "first", "last", "mid", "previous"] | int
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
UNET = Role(families=("diffusers",), description="the denoising UNet (with its scheduler config)")
TEXT_ENCODER = Role(families=("diffusers",), description="the CLIP text encoder and its tokenizer")


class AttentionLayer(Model):
    is_cross: bool
    query_len: int
    shape: tuple[int, ...] = Field(description="(F, heads, queries, keys) of a map, or (F, heads, queries, channels).")
    stored: Literal["maps", "tokens"] = Field(
        description="maps: the probabilities (cross-attention); tokens: queries and key-frame keys (self-attention)."
    )
    key_frames: list[int] | None = Field(default=None, description="Tokens: the frames whose keys are stored.")
    frame_indices: list[list[int]] | None = Field(default=None, description="Tokens: the key frames of every frame.")

    @model_validator(mode="after")
    def _check(self) -> AttentionLayer:
        if self.stored == "maps" and not self.is_cross:
            raise ValueError("self-attention layers are stored as tokens (queries and keys), not maps")
        if self.stored == "tokens":
            if self.is_cross or self.key_frames is None or self.frame_indices is None:
                raise ValueError("a tokens layer is a self-attention layer with key_frames and frame_indices")
            if self.key_frames != sorted({frame for row in self.frame_indices for frame in row}):
                raise ValueError("key_frames must be the sorted frames that frame_indices name")
        return self


class DdimAttentionInversion(Attrs):
    """What FateZero's inversion leaves for its edits: the schedule, the recorded steps and layers."""

    source_prompt: str
    num_steps: int
    timesteps: list[int] = Field(description="Inversion timesteps, ascending.")
    recorded_steps: list[int]
    recorded_cross_steps: list[int]
    recorded_self_steps: list[int]
    frame_keys: list[FrameKey]
    min_channels: int
    layers: dict[str, AttentionLayer] = Field(description="Recorded layer -> what its maps are.")


register_kind(
    "inversion/ddim-attention",
    DdimAttentionInversion,
    "DDIM inversion latents of every step with the self/cross attention maps recorded on the way (FateZero)",
)


class InvertLatentsParams(Model):
    """DDIM inversion with the source prompt and no guidance, recording attention as it goes."""

    source_prompt: str = Field(min_length=1, description="A caption of the source video (what it shows now).")
    num_steps: PositiveInt = Field(default=50, le=1000, description="DDIM steps; edits use the same number.")
    frame_keys: tuple[FrameKey, ...] = Field(
        default=("mid",),
        description="Frames whose keys/values each frame's self-attention reads: 'self', 'first', 'last', 'mid', "
        "'previous' or a relative offset. ('mid',) is the released configs; ('self', 'mid') the paper.",
    )
    min_channels: int = Field(
        default=640, ge=0, description="Self-attention layers with fewer channels stay per-frame (least_sc_channel)."
    )
    max_query_len: PositiveInt = Field(
        default=1024,
        description="Record only layers whose query length (h*w) is at most this: 1024 is the reference's choice "
        "(32x32 and below at 512 px); 4096 records the 64x64 layers too (self-attention is stored as queries and "
        "keys, so its bytes grow with the tokens, not their square).",
    )
    record_fraction: Fraction = Field(
        default=1.0,
        gt=0.0,
        description="Fraction of the edit's steps, from the noisiest, whose cross-attention maps are recorded: the "
        "largest cross replace window among the edits that will use this inversion (and their self window when "
        "they blend, since the blend mask comes from cross-attention).",
    )
    record_self_fraction: Fraction | None = Field(
        default=None,
        description="The same for self-attention maps (most of the bytes): the largest self replace window of "
        "the edits. None: the same as record_fraction.",
    )

    @property
    def self_fraction(self) -> float:
        return self.record_fraction if self.record_self_fraction is None else self.record_self_fraction


@register_stage
class InvertLatents(StageSpec):
    """Invert latents to noise with DDIM, streaming the latents and what each step's attention needs for
    replay to the store: cross-attention maps, self-attention queries and key-frame keys."""

    # 2: self-attention stored as queries and keys, not maps (an inversion of version 1 is never read).
    version: ClassVar[str] = "2"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"latents": ("latents",)}
    produces: ClassVar[str] = "inversion/ddim-attention"
    roles: ClassVar[dict[str, Role]] = {"unet": UNET, "text_encoder": TEXT_ENCODER}
    # The tiny UNet has no 640-channel level: cross-frame attention on every layer instead.
    demo: ClassVar[dict[str, Any]] = {"num_steps": 6, "min_channels": 0}

    stage: Literal["invert_latents"] = "invert_latents"
    method: Literal["fatezero"] = Field(default="fatezero", description="DDIM inversion recording attention.")
    params: InvertLatentsParams = Field(description="Inversion options.")


class FateZeroParams(Model):
    """One FateZero edit: a target prompt and how the inversion's attention is fused into it."""

    target_prompt: str = Field(min_length=1, description="What the edited video should show.")
    negative_prompt: str = Field(default="", description="Unconditional prompt for classifier-free guidance.")
    guidance_scale: float = Field(default=7.5, ge=1.0, le=30.0, description="Classifier-free guidance scale.")
    cross_replace_steps: Fraction = Field(
        default=0.8, description="Fraction of steps (noisiest first) where cross-attention is fused."
    )
    self_replace_steps: Fraction = Field(
        default=0.6, description="Fraction of steps (noisiest first) where self-attention is fused."
    )
    replace: bool = Field(
        default=False,
        description="Prompt-to-Prompt replace (prompts with the same word count) instead of refine (token alignment).",
    )
    reweight: dict[str, float] = Field(
        default_factory=dict, description="Target words whose cross-attention is multiplied, e.g. {watercolor: 10}."
    )
    blend_words: tuple[Annotated[list[str], Field(min_length=1)], Annotated[list[str], Field(min_length=1)]] | None = Field(
        default=None,
        description="[source words, target words] of a local edit; their source cross-attention makes the "
        "self-attention blend mask. None: self-attention is replaced everywhere (style edits).",
    )
    blend_threshold: Fraction = Field(default=0.3, description="Mask threshold on the per-frame normalised map.")
    blend_latents: bool = Field(
        default=False,
        description="Also keep the inversion's latents outside the union of the source and target blend-word "
        "masks in the middle 60% of the steps (needs record_fraction >= 0.8).",
    )
    blend_resolution: PositiveInt | None = Field(
        default=None,
        description="Side of the cross-attention maps that make the mask; None: a quarter of the latent side "
        "(16 for 64x64 latents), or the nearest recorded one.",
    )

    @model_validator(mode="after")
    def _check(self) -> FateZeroParams:
        if self.blend_latents and self.blend_words is None:
            raise ValueError("blend_latents needs blend_words: give [[source words], [target words]]")
        words = self.target_prompt.split()
        for word in [*self.reweight, *(self.blend_words[1] if self.blend_words else [])]:
            if word not in words:
                raise ValueError(f"{word!r} is not a word of the target prompt {self.target_prompt!r}; words match as spelled")
        return self


@register_stage
class DenoiseLatents(StageSpec):
    """Denoise from the inverted latents with the target prompt, fusing the stored attention (FateZero)."""

    # 2: self-attention fused through scaled_dot_product_attention from stored queries and keys.
    version: ClassVar[str] = "2"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"inversion": ("inversion/ddim-attention",)}
    produces: ClassVar[str] = "latents"
    roles: ClassVar[dict[str, Role]] = {"unet": UNET, "text_encoder": TEXT_ENCODER}
    same_model_slots: ClassVar[tuple[str, ...]] = ("inversion",)

    stage: Literal["denoise_latents"] = "denoise_latents"
    method: Literal["fatezero"] = Field(default="fatezero", description="Attention-fusion editing (FateZero).")
    params: FateZeroParams = Field(description="The edit.")

    def check_inputs(self, producers: Mapping[str, StageSpec]) -> None:
        inversion, p = producers["inversion"], self.params
        source_words = inversion.params.source_prompt.split()
        for word in p.blend_words[0] if p.blend_words else []:
            if word not in source_words:
                raise ValueError(f"blend word {word!r} is not a word of the source prompt {inversion.params.source_prompt!r}")
        cross_needed = max(
            p.cross_replace_steps, p.self_replace_steps if p.blend_words else 0.0, 0.8 if p.blend_latents else 0.0
        )
        for needed, recorded, name, kind in (
            (cross_needed, inversion.params.record_fraction, "record_fraction", "cross"),
            (p.self_replace_steps, inversion.params.self_fraction, "record_self_fraction", "self"),
        ):
            if needed > recorded:
                raise ValueError(
                    f"its windows need {kind}-attention maps for {needed} of the steps but {inversion.id!r} records "
                    f"{recorded} of them; set {inversion.id}.params.{name} to at least {needed}"
                )


METHOD = Method(
    name="fatezero",
    description="FateZero (Qi et al. 2023): DDIM inversion recording attention, attention-fusion editing.",
    implementations=("reelflow.tasks.fatezero",),
)
