"""Stage declarations of Videoshop (Fan et al. 2024, "Videoshop: Localized Semantic Video Editing with
Noise-Extrapolated Diffusion Inversion"): propagate an edited first frame through a clip with
Stable Video Diffusion.

``embed_content`` (method ``image``) embeds the edited frame; ``invert_latents`` (``videoshop``)
inverts the clip's latents window by window with noise extrapolation, conditioned on each window's
source first frame; ``denoise_latents`` (``videoshop``) generates every window back conditioned on
an edited frame (the user's for the first window, the previous window's output for the others) and
decodes it. Defaults follow the reference's run.py (methods.md 2.4): 25 Euler steps at strength 0.55,
Sigma 1.0, guidance 4.0, noise augmentation 0.2, fps 7, motion bucket 127.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from reelflow.schemas.base import Model, PositiveInt
from reelflow.schemas.kinds import Attrs, Resize, WindowInfo, register_kind
from reelflow.schemas.registry import Method
from reelflow.schemas.stages import Role, StageSpec, register_stage

SVD_UNET = Role(description="the spatio-temporal UNet (with its Euler scheduler config)", tiny="svd")
SVD_VAE = Role(description="the VAE with the temporal decoder", tiny="svd")
IMAGE_ENCODER = Role(description="the CLIP image encoder with projection (and its image processor)", tiny="svd")
Normalisation = Literal["per_frame", "per_channel", "none"]
NoiseAug = Field(default=0.2, ge=0.0, le=1.0, description="Noise added to the conditioning image in [-1, 1] pixels "
                 "before it is VAE-encoded (the reference's 0.2; the SVD pipeline's default is 0.02).")  # fmt: skip


class ImageContent(Attrs):
    """An image's conditioning for an image-to-video model."""

    image_size: tuple[int, int] = Field(description="The image as given, (width, height).")
    size: tuple[int, int] = Field(description="After resizing like the video, (width, height).")
    resize: Resize = Field(description="How it was resized: the video's policy applied to its own size.")
    embedding_dim: int = Field(description="Width of the CLIP image embedding.")
    noise_aug_strength: float = Field(description="Noise added before encoding the conditioning latents.")


register_kind(
    "content/image",
    ImageContent,
    "an image resized like the video, its CLIP image embedding and its VAE latents (clean and noise-augmented)",
)


class EdmInversion(Attrs):
    """What Videoshop's inversion leaves for its edits: the schedule, the windows, the conditioning."""

    num_steps: int = Field(description="Euler steps of the full schedule.")
    strength: float = Field(description="The edit's strength: generation starts where the inversion ended.")
    sigmas: list[float] = Field(description="The sigmas generation visits, from the inversion's end down.")
    threshold: float = Field(description="Sigma, the extrapolation threshold.")
    naive: bool = Field(description="Whether the network was evaluated at the current latents (the ablation).")
    normalisation: Normalisation = Field(description="How the latents were normalised before inverting.")
    fps: int = Field(description="The fps micro-condition of both passes.")
    motion_bucket_id: int = Field(description="The motion micro-condition of both passes.")
    windows: WindowInfo = Field(description="How the clip was cut into windows.")


register_kind(
    "inversion/edm",
    EdmInversion,
    "EDM (Euler) inversion latents of every step, per window, with noise extrapolation (Videoshop)",
)


class EmbedImageParams(Model):
    """How the edited frame conditions the model."""

    noise_aug_strength: float = NoiseAug


@register_stage
class EmbedImage(StageSpec):
    """Resize an image like the video, embed it with CLIP and encode it with the VAE (clean and noise-augmented)."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"frames": ("video_frames",)}
    produces: ClassVar[str] = "content/image"
    roles: ClassVar[dict[str, Role]] = {"image_encoder": IMAGE_ENCODER, "vae": SVD_VAE}
    reads: ClassVar[dict[str, str]] = {"image": "image"}
    demo_sources: ClassVar[dict[str, str]] = {"image": "reelflow.core.synthetic:write_edited_first_frame"}

    stage: Literal["embed_content"] = "embed_content"
    method: Literal["image"] = Field(default="image", description="Content from one image (an edited first frame).")
    params: EmbedImageParams = Field(default_factory=EmbedImageParams, description="Conditioning options.")

    def seeded(self) -> bool:
        return self.params.noise_aug_strength > 0


class VideoshopInvertParams(Model):
    """Noise-extrapolated inversion on Stable Video Diffusion, conditioned on each window's source first frame."""

    num_steps: PositiveInt = Field(default=25, le=1000, description="Euler steps of the full schedule.")
    strength: float = Field(
        default=0.55, gt=0.0, le=1.0,
        description="Fraction of the schedule inverted and regenerated: 0.55 of 25 steps climbs to sigma 15.59 in 13 steps.",
    )  # fmt: skip
    threshold: float = Field(
        default=1.0, ge=0.0, description="Sigma: above it the proxy extrapolates the line through x0; at or below, random noise."
    )
    naive: bool = Field(default=False, description="Evaluate the network at the current latents (the ablation).")
    normalisation: Normalisation = Field(
        default="per_frame",
        description="Latent normalisation before inverting: per frame over (C, h, w) as the reference code does, per "
        "channel over (F, h, w) as the paper says, or none (the ablation).",
    )
    fps: PositiveInt = Field(default=7, description="The fps micro-condition (the UNet sees fps - 1).")
    motion_bucket_id: int = Field(default=127, ge=0, le=255, description="The motion micro-condition.")
    noise_aug_strength: float = NoiseAug
    window: PositiveInt | None = Field(
        default=None, description="Frames per window; None: the UNet's own frame count (14 for img2vid, 25 for -xt)."
    )
    overlap: PositiveInt = Field(
        default=1,
        description="Frames neighbouring windows share; each window is conditioned on the previous one's output at "
        "the first of them. Every window has the model's frame count, so an overlap above one frame fits only "
        "clips it divides evenly enough (the run says so before any model loads).",
    )
    check_reconstruction: bool = Field(
        default=True,
        description="Generate each window back with the inversion's own conditioning and store the per-frame error "
        "(as many network calls again as the inversion).",
    )


@register_stage
class InvertLatents(StageSpec):
    """Invert the clip's latents window by window up to the edit's starting sigma, storing every step."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"latents": ("latents",), "frames": ("video_frames",)}
    produces: ClassVar[str] = "inversion/edm"
    roles: ClassVar[dict[str, Role]] = {"unet": SVD_UNET, "image_encoder": IMAGE_ENCODER, "vae": SVD_VAE}
    demo: ClassVar[dict[str, Any]] = {"num_steps": 6, "strength": 0.5}

    stage: Literal["invert_latents"] = "invert_latents"
    method: Literal["videoshop"] = Field(default="videoshop", description="Noise-extrapolated EDM inversion (Videoshop).")
    params: VideoshopInvertParams = Field(default_factory=VideoshopInvertParams, description="Inversion options.")

    def seeded(self) -> bool:
        return True  # the proxy's noise and the conditioning's noise augmentation


class VideoshopParams(Model):
    """Generation conditioned on the edited frame, and how windows are kept consistent."""

    min_guidance_scale: float = Field(default=4.0, ge=1.0, le=30.0, description="Guidance on the first frame of a window.")
    max_guidance_scale: float = Field(
        default=4.0, ge=1.0, le=30.0,
        description="Guidance on the last frame (linear in between); the reference holds 4.0, the SVD pipeline ramps 1 to 3.",
    )  # fmt: skip
    rescale: bool = Field(default=True, description="Rescale the latents to the edited frame's latent statistics.")
    window_colour: Literal["boundary", "first_frame", "none"] = Field(
        default="boundary",
        description="How windows after the first keep their colour: boundary maps each window per channel so its "
        "shared frames match the previous window's output on them, the map fading out by the frames it shares with "
        "the next window (maps never compound); first_frame rescales every window's latents to the edited first "
        "frame's statistics; none relies on the conditioning and the latent rescaling alone.",
    )
    decode_chunk_size: PositiveInt | None = Field(
        default=None,
        description="Frames per temporal-decoder call; None: a whole window at once, as the reference. Smaller bounds "
        "peak memory, but frames in different calls do not see each other (a seam inside the window).",
    )

    @model_validator(mode="after")
    def _ramp_rises(self) -> VideoshopParams:
        if self.min_guidance_scale > self.max_guidance_scale:
            raise ValueError(f"min_guidance_scale {self.min_guidance_scale} is above max_guidance_scale "
                             f"{self.max_guidance_scale}; the ramp rises from a window's first frame to its last")  # fmt: skip
        return self


@register_stage
class DenoiseLatents(StageSpec):
    """Generate every window from its inversion conditioned on an edited frame, rescale, decode and stitch."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"inversion": ("inversion/edm",), "content": ("content/image",)}
    produces: ClassVar[str] = "frames"
    roles: ClassVar[dict[str, Role]] = {"unet": SVD_UNET, "image_encoder": IMAGE_ENCODER, "vae": SVD_VAE}
    same_model_slots: ClassVar[tuple[str, ...]] = ("inversion", "content")

    stage: Literal["denoise_latents"] = "denoise_latents"
    method: Literal["videoshop"] = Field(default="videoshop", description="Edited-first-frame propagation (Videoshop).")
    params: VideoshopParams = Field(default_factory=VideoshopParams, description="Generation options.")

    def seeded(self) -> bool:
        return True  # the noise augmentation of later windows' conditioning frames


METHOD = Method(
    name="videoshop",
    description="Videoshop (Fan et al. 2024): an edited first frame propagated with Stable Video Diffusion.",
    implementations=("reelflow.tasks.videoshop",),
    tiny={"svd": "reelflow.core.tiny:build_tiny_svd"},
)
