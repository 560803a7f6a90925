"""Stage declaration of ``compute_metrics`` and the metrics it knows, each declared with what it needs, so a pipeline
asks for metrics by name and the stage takes exactly the inputs, models and prompts they need (and refuses a
metric whose needs are not met before anything runs).

A need is one of :data:`NEEDS`: an input of the stage (``mask``: the edit's region, ``flow``: the source's
optical flow, ``audio``: per-frame audio embeddings), a model by role (``clip``: CLIP with both towers,
``dino``: a DINO ViT, ``lpips``: LPIPS VGG16), or a param (``prompt``: the target prompt,
``source_prompt``). A method package adds a metric with :func:`register_metric` and its implementation in
``reelflow.tasks.metrics.IMPLEMENTATIONS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

import reelflow.schemas.audio  # noqa: F401  (the kinds compute_metrics reads)
import reelflow.schemas.flow  # noqa: F401
import reelflow.schemas.masks  # noqa: F401
from reelflow.schemas.base import Model, PositiveInt
from reelflow.schemas.registry import Method
from reelflow.schemas.stages import Export, Role, StageSpec, register_stage

NEEDS: dict[str, Literal["input", "role", "param"]] = {
    "mask": "input", "flow": "input", "audio": "input",
    "clip": "role", "dino": "role", "lpips": "role",
    "prompt": "param", "source_prompt": "param",
}  # fmt: skip


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its values are per ``frame`` or per neighbouring ``pair``; ``better`` says which way is good."""

    name: str
    description: str
    needs: frozenset[str] = frozenset()
    per: Literal["frame", "pair"] = "frame"
    better: Literal["higher", "lower"] = "higher"


METRICS: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec) -> MetricSpec:
    """Add a metric; its needs must be known ones and its name new."""
    unknown = spec.needs - set(NEEDS)
    if unknown:
        raise ValueError(f"metric {spec.name!r} needs {sorted(unknown)}, which are not needs a metric can have: {', '.join(NEEDS)}")
    if spec.name in METRICS and METRICS[spec.name] != spec:
        raise ValueError(f"metric {spec.name!r} is declared twice")
    METRICS[spec.name] = spec
    return spec


_CLIP = "CLIP image embeddings, cosine in [-1, 1] (papers print it x100)"
for _spec in (
    MetricSpec("psnr", "PSNR of each edited frame against its source frame, dB"),
    MetricSpec("ssim", "SSIM (11x11 Gaussian, sigma 1.5) against the source frame"),
    MetricSpec("lpips", "LPIPS (VGG16, v0.1) against the source frame", frozenset({"lpips"}), better="lower"),
    MetricSpec("psnr_outside", "PSNR over the pixels outside the mask: background preservation, dB", frozenset({"mask"})),
    MetricSpec("psnr_inside", "PSNR over the pixels inside the mask, dB", frozenset({"mask"})),
    MetricSpec("ssim_outside", "SSIM over windows centred outside the mask", frozenset({"mask"})),
    MetricSpec("ssim_inside", "SSIM over windows centred inside the mask", frozenset({"mask"})),
    MetricSpec("lpips_outside", "LPIPS between the frames with the mask blacked out", frozenset({"mask", "lpips"}), better="lower"),
    MetricSpec("lpips_inside", "LPIPS between the frames with all but the mask blacked out", frozenset({"mask", "lpips"}),
               better="lower"),
    MetricSpec("clip_text", f"text alignment: {_CLIP} of each frame against the target prompt's text embedding",
               frozenset({"clip", "prompt"})),
    MetricSpec("clip_consistency_consecutive", f"frame consistency over consecutive pairs: {_CLIP} of neighbouring frames",
               frozenset({"clip"}), per="pair"),
    MetricSpec("clip_consistency_all_pairs", f"frame consistency over all pairs: per frame, the mean {_CLIP} to every other",
               frozenset({"clip"})),
    MetricSpec("clip_source", f"similarity to the source: {_CLIP} of each edited frame and its source frame", frozenset({"clip"})),
    MetricSpec("frame_accuracy", "1 where a frame's CLIP image embedding is closer to the target prompt than to the source "
               "prompt", frozenset({"clip", "prompt", "source_prompt"})),
    MetricSpec("warp_error", "squared error between each frame and its successor warped back by the source's flow, "
               "occluded pixels left out, in [0, 1] units", frozenset({"flow"}), per="pair", better="lower"),
    MetricSpec("flicker", "mean absolute difference between neighbouring edited frames, in [0, 1]", per="pair", better="lower"),
    MetricSpec("dino_consistency", "subject consistency (VBench): per frame after the first, the mean of the cosines of "
               "its DINO class token to the first frame's and the previous frame's, each clamped at 0 (frames resized "
               "by the model's image processor: VBench keeps the aspect ratio)", frozenset({"dino"}), per="pair"),
    MetricSpec("audio_visual", "cosine between each frame's audio embedding and the CLIP image embedding of the frame (of "
               "its masked region when a mask is wired)", frozenset({"clip", "audio"})),
):  # fmt: skip
    register_metric(_spec)


class ComputeMetricsParams(Model):
    metrics: tuple[str, ...] = Field(
        default=("psnr", "ssim"), min_length=1,
        description="Metrics to compute, per frame (or per pair of neighbouring frames) and as a mean; any of "
        "`reelflow stages --metrics`. Each takes the inputs, models and prompts it needs.",
    )  # fmt: skip
    prompt: str | None = Field(default=None, description="The edit's target prompt (clip_text, frame_accuracy).")
    source_prompt: str | None = Field(default=None, description="The prompt of the source (frame_accuracy).")
    batch_size: PositiveInt = Field(default=8, le=1024, description="Frames per CLIP, DINO or LPIPS call.")

    @field_validator("metrics")
    @classmethod
    def _known(cls, metrics: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics {list(metrics)} name one twice")
        return metrics

    @model_validator(mode="after")
    def _prompts(self) -> ComputeMetricsParams:
        for name in self.metrics:
            for need in ("prompt", "source_prompt"):
                if need in METRICS[name].needs and not getattr(self, need):
                    raise ValueError(f"metric {name} needs `{need}`: the {'target' if need == 'prompt' else 'source'} prompt")
        return self

    def needs(self) -> frozenset[str]:
        """What the chosen metrics need, together (schemas.metrics.NEEDS)."""
        return frozenset().union(*(METRICS[name].needs for name in self.metrics))


@register_stage
class ComputeMetrics(StageSpec):
    """Compare the edited frames with the source by the metrics asked for, per frame and on average."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {
        "source": ("video_frames",),
        "edited": ("frames", "video_frames"),
        "mask": ("masks",),
        "flow": ("flow",),
        "audio": ("audio_embeddings",),
    }
    optional_slots: ClassVar[tuple[str, ...]] = ("mask", "flow", "audio")
    produces: ClassVar[str] = "metrics"
    roles: ClassVar[dict[str, Role]] = {
        "clip": Role(families=("transformers",), tiny="clip-512",
                     description="CLIP with both towers and their projections (openai/clip-vit-base-patch32)"),
        "dino": Role(families=("transformers",), tiny="dino", description="a DINO ViT (facebook/dino-vitb16)"),
        "lpips": Role(families=("lpips",), tiny="lpips-vgg", description="LPIPS v0.1 on VGG16"),
    }  # fmt: skip
    optional_roles: ClassVar[tuple[str, ...]] = ("clip", "dino", "lpips")
    exports: ClassVar[tuple[Export, ...]] = (Export(kind="metrics"),)

    stage: Literal["compute_metrics"] = "compute_metrics"
    params: ComputeMetricsParams = Field(default_factory=ComputeMetricsParams, description="Which metrics.")

    def fills(self, role: str) -> bool:
        return role in self.params.needs()

    def wires(self, slot: str) -> bool:
        """The inputs the metrics need; the mask also for audio_visual, which then looks at the region alone."""
        return slot in self.params.needs() or (slot == "mask" and "audio_visual" in self.params.metrics)

    def check_inputs(self, producers: Mapping[str, StageSpec]) -> None:
        flow, source = producers.get("flow"), producers.get("source")
        if "flow" in self.params.needs() and flow is not None and source is not None:
            estimated_on = flow.inputs.get("frames", source.id)
            if estimated_on != source.id:
                raise ValueError(f"warp_error holds the edit to the source's motion, but the flow {flow.id!r} is estimated "
                                 f"on {estimated_on!r}, not on the source {source.id!r}; wire its frames to {source.id!r}")  # fmt: skip
        for name in self.params.metrics:
            missing = [need for need in sorted(METRICS[name].needs) if NEEDS[need] == "input" and need not in producers]
            if missing:
                raise ValueError(f"metric {name} needs a `{missing[0]}` input ({' or '.join(self.slots[missing[0]])}): add a "
                                 f"stage that makes it and wire `{missing[0]}` to it, or leave {name} out")  # fmt: skip

    def key_params(self) -> dict[str, Any]:
        """Batching changes no value, and a prompt only the metrics that read it."""
        needs = self.params.needs()
        return {k: v for k, v in super().key_params().items()
                if k != "batch_size" and (k not in ("prompt", "source_prompt") or k in needs)}  # fmt: skip


METHOD = Method(
    name="metrics",
    description="compute_metrics: the evaluation metrics of the video-editing papers, each with what it needs.",
    implementations=("reelflow.tasks.metrics",),
    tiny={"dino": "reelflow.core.tiny_metrics:build_tiny_dino"},
)
