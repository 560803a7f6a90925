"""Stage declaration of Soundini (Lee et al. 2023, "Soundini: Sound-Guided Diffusion for Natural Video Editing";
methods.md 5): the region of a clip re-rendered so its look follows a sound over time, temporally
consistent, the background untouched.

``denoise_latents`` method ``soundini`` runs on either of two backbones (param ``backbone``): the
reference's pixel-space unconditional ADM (``pixel``: guided-diffusion's ``256x256_diffusion_uncond``,
family ``guided_diffusion``), which takes the frames alone, or Stable Diffusion 1.5 in latent space
(``latent``), which takes the source's ``latents`` (``encode_latents``) with its ``vae`` and
``text_encoder``. DDIM
from the source noised to ``strength``, each step's noise prediction shifted by the gradient of the
guidance losses on the step's denoised estimate (decoded to pixels on SD) (sound ``L_SG`` against each
frame's own audio window, or, in the text-guided variant, against a prompt's CLIP text embedding
from ``embed_content`` method ``clip_text``; direction ``L_DSG``, optical flow, background (L1 and LPIPS) and range; the flow and
background terms ramped in over ``ramp``), the source noised to each level kept outside the
mask, and the source's background pasted back at the end. Its inputs are stages any method can use:
``embed_audio`` (the sound, one embedding per frame), ``estimate_flow`` (the source's motion),
``decode_mask`` (the region).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

import reelflow.schemas.audio  # noqa: F401  (the kinds these stages read)
import reelflow.schemas.flow  # noqa: F401
import reelflow.schemas.masks  # noqa: F401
from reelflow.schemas.base import Model, PositiveInt
from reelflow.schemas.kinds import Attrs, register_kind
from reelflow.schemas.registry import Method
from reelflow.schemas.stages import SD_VAE, Role, StageSpec, register_stage

CLIP_IMAGE = Role(
    families=("transformers",),
    description="the CLIP image encoder with projection whose space the audio encoder shares (ViT-B/32 for Soundini's)",
    tiny="clip-512",
)
LPIPS = Role(families=("lpips",), description="LPIPS (VGG16) for the perceptual background term", tiny="lpips-vgg")
CLIP_TEXT = Role(families=("transformers",), description="the CLIP text encoder with projection (and its tokenizer)",
                 tiny="clip-512")


class ClipText(Attrs):
    """The prompt a CLIP text embedding was made from."""

    prompt: str = Field(description="What the region should look like.")


register_kind("content/clip_text", ClipText, "a prompt's projected CLIP text embedding, in the space CLIP images embed into")


class EmbedClipTextParams(Model):
    prompt: str = Field(min_length=1, description="What the region should look like, in place of a sound.")


@register_stage
class EmbedClipText(StageSpec):
    """Embed a prompt with CLIP's text tower: the target of Soundini's text-guided variant, in place of the sound."""

    version: ClassVar[str] = "1"
    produces: ClassVar[str] = "content/clip_text"
    roles: ClassVar[dict[str, Role]] = {"clip": CLIP_TEXT}

    stage: Literal["embed_content"] = "embed_content"
    method: Literal["clip_text"] = Field(default="clip_text", description="Content from a prompt, in CLIP's space.")
    params: EmbedClipTextParams = Field(description="The prompt.")


Backbone = Literal["latent", "pixel"]


class SoundiniParams(Model):
    """The schedule and the weights of the guidance losses. The weights are the reference prototype's, which were
    tuned for its pixel-space model; on SD latents, with the gradient through the VAE decoder, the effective pull
    differs, so treat them as a starting point per clip. Each weight multiplies a sum of per-frame terms."""

    backbone: Backbone = Field(
        default="latent",
        description="latent: SD 1.5, denoising `latents` from encode_latents, with the bundle's vae and text_encoder; "
        "pixel: guided-diffusion's ADM (or any unconditional UNet2DModel on RGB), denoising the frames themselves.",
    )
    num_steps: PositiveInt = Field(default=50, le=1000, description="DDIM steps of the full schedule.")
    strength: float = Field(default=0.8, gt=0.0, le=1.0, description="How far the source is noised before denoising.")
    sound: float = Field(default=1000.0, ge=0.0, description="Weight of L_SG: each frame's region against its own sound window (or the prompt).")
    direction: float = Field(default=1000.0, ge=0.0, description="Weight of L_DSG: the change of look follows the change of sound.")
    flow: float = Field(default=5000.0, ge=0.0, description="Weight of the optical-flow loss inside the region (ramped in).")
    background: float = Field(default=100.0, ge=0.0, description="Weight of the L1 background loss outside the region (ramped in).")
    perceptual: float = Field(
        default=100.0, ge=0.0,
        description="Weight of the perceptual (LPIPS) background loss outside the region (ramped in); above 0 the "
        "stage takes an `lpips` model (the pipeline's one, or the one its `models` name).",
    )  # fmt: skip
    range: float = Field(default=50.0, ge=0.0, description="Weight of the range loss keeping the estimate in [-1, 1].")
    ramp: float = Field(
        default=0.5, gt=0.0, le=1.0,
        description="Fraction of the steps run over which the flow and background weights rise to full (the "
        "prototype's 50 of its 100 steps).",
    )  # fmt: skip
    augmentations: PositiveInt = Field(default=8, le=64, description="CLIP views per frame (the first unaugmented).")
    chunk: PositiveInt = Field(
        default=4, description="Frames per guided pass (plus the previous frame as a fixed neighbour); bounds memory. "
        "Frames are pulled alike in any chunk, but the neighbour is held fixed, so results change a little with it.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _takes_a_step(self) -> SoundiniParams:
        if int(self.num_steps * self.strength) < 1:
            raise ValueError(f"strength {self.strength} of {self.num_steps} steps takes no step; raise either")
        return self


@register_stage
class DenoiseSoundini(StageSpec):
    """Re-render the masked region so it follows the sound, frame by frame in chunks, background kept."""

    version: ClassVar[str] = "2"  # 2: the resume state in two alternating slots, not every step
    slots: ClassVar[dict[str, tuple[str, ...]]] = {
        "latents": ("latents",), "frames": ("video_frames",), "target": ("audio_embeddings", "content/clip_text"),
        "flow": ("flow",), "mask": ("masks",),
    }  # fmt: skip
    optional_slots: ClassVar[tuple[str, ...]] = ("latents",)  # the latent backbone's
    produces: ClassVar[str] = "frames"
    roles: ClassVar[dict[str, Role]] = {
        "unet": Role(families=("diffusers", "guided_diffusion"),
                     description="the denoiser with its scheduler: guided-diffusion's pixel-space ADM, or the SD 1.5 UNet"),
        "text_encoder": Role(description="SD only: the CLIP text encoder, for the UNet's empty prompt"),
        "vae": SD_VAE,
        "clip": CLIP_IMAGE,
        "lpips": LPIPS,
    }  # fmt: skip
    optional_roles: ClassVar[tuple[str, ...]] = ("text_encoder", "vae", "lpips")
    demo: ClassVar[dict[str, Any]] = {"num_steps": 4, "augmentations": 2, "chunk": 2}

    stage: Literal["denoise_latents"] = "denoise_latents"
    method: Literal["soundini"] = Field(default="soundini", description="Sound-guided editing (Soundini), in pixels or SD latents.")
    params: SoundiniParams = Field(default_factory=SoundiniParams, description="Schedule and loss weights.")

    def seeded(self) -> bool:
        return True  # the noise, and the CLIP augmentations

    def fills(self, role: str) -> bool:
        """The latent backbone's vae and text_encoder; the LPIPS model while the perceptual term weighs anything."""
        if role in ("vae", "text_encoder"):
            return self.params.backbone == "latent"
        if role == "lpips":
            return self.params.perceptual > 0
        return super().fills(role)

    def wires(self, slot: str) -> bool:
        return slot != "latents" or self.params.backbone == "latent"

    def check_inputs(self, producers: Mapping[str, StageSpec]) -> None:
        if self.params.backbone == "pixel" and "latents" in producers:
            raise ValueError("the pixel backbone denoises the frames themselves and reads no `latents`; drop them from "
                             "its inputs, or set `backbone: latent` for SD")  # fmt: skip
        if self.params.backbone == "latent" and "latents" not in producers:
            raise ValueError("the latent backbone (SD 1.5) denoises `latents`: add an encode_latents stage and wire "
                             "`latents: encode_latents`, or set `backbone: pixel` for guided-diffusion's ADM")  # fmt: skip


METHOD = Method(
    name="soundini",
    description="Soundini (Lee et al. 2023): sound-guided editing of a masked region with flow and background losses.",
    implementations=("reelflow.tasks.soundini",),
    tiny={"clip-512": "reelflow.core.tiny_audio:build_tiny_clip_512", "adm": "reelflow.core.tiny_adm:build_tiny_adm",
          "lpips-vgg": "reelflow.core.tiny_lpips:build_tiny_lpips"},
)
