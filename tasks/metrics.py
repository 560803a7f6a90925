"""compute_metrics: the metrics a pipeline names (schemas.metrics), per frame or per pair of neighbouring frames and
on average, each from exactly what it needs: the source and edited frames, and where asked for, the edit's mask, the
source's flow, the audio embeddings, CLIP, DINO or LPIPS, and the prompts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from reelflow.core import evaluation
from reelflow.core.frames import to_model_range
from reelflow.core.metrics import psnr, ssim
from reelflow.core.audio.perception import image_width
from reelflow.core.text import projected, projected_text
from reelflow.schemas.calls import StageCall
from reelflow.schemas.errors import SpecError
from reelflow.schemas.kinds import Metrics
from reelflow.schemas.metrics import METRICS, ComputeMetricsParams
from reelflow.schemas.refs import ArtifactRef
from reelflow.tasks.artifacts import contact_sheet, markdown_table, spread
from reelflow.tasks.preflight import PreflightContext, stage_check
from reelflow.tasks.frames import frame_labels
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

SHEET_FRAMES = 8


@stage_task("compute_metrics")
def compute_metrics(call: StageCall) -> ArtifactRef:
    """One array per metric, ``(F,)`` per frame or ``(F-1,)`` per pair, and their means (NaNs left out) in the attrs
    under ``metrics``."""
    return run_stage(call, _compute)


@dataclass
class MetricInputs:
    """What the metrics read, each model's embeddings computed once however many metrics use them."""

    ctx: StageContext
    params: ComputeMetricsParams
    source: np.ndarray
    edited: np.ndarray
    _cache: dict[str, Any] = field(default_factory=dict)

    def once(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    @property
    def mask(self) -> np.ndarray:
        return self.once("mask", lambda: np.asarray(self.ctx.input("mask")["mask"][:], bool))

    def clip_images(self, which: str) -> torch.Tensor:
        """CLIP image embeddings of the ``source`` or ``edited`` frames."""
        frames = self.source if which == "source" else self.edited
        return self.once(f"clip-{which}", lambda: _clip_images(self.ctx, frames, self.params.batch_size))

    def clip_text(self, prompt: str) -> torch.Tensor:
        return self.once(f"text-{prompt}", lambda: _clip_text(self.ctx, prompt))

    def lpips(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        model = self.once("lpips-model", lambda: self.ctx.model("lpips"))
        parameter = next(model.parameters())
        out = []
        for start in range(0, len(x), self.params.batch_size):
            part = slice(start, start + self.params.batch_size)
            with torch.inference_mode():
                out.append(model(to_model_range(x[part]).to(parameter.device, parameter.dtype),
                                 to_model_range(y[part]).to(parameter.device, parameter.dtype)).float().cpu())  # fmt: skip
        return torch.cat(out).double().numpy()


def _clip_images(ctx: StageContext, frames: np.ndarray, batch: int) -> torch.Tensor:
    """CLIP's projected image embeddings ``(F, D)`` (``CLIPModel.get_image_features``)."""
    model = ctx.model("clip", cls="CLIPModel")
    return _embed_frames(ctx, "clip", model, frames, batch,
                         lambda pixels: projected(model.get_image_features(pixel_values=pixels)))  # fmt: skip


def _clip_text(ctx: StageContext, prompt: str) -> torch.Tensor:
    return projected_text(ctx.model("clip", "tokenizer"), ctx.model("clip", cls="CLIPModel"), [prompt])


def _dino(inputs: MetricInputs) -> torch.Tensor:
    """DINO's class token ``(F, D)`` of each edited frame."""
    model = inputs.ctx.model("dino")
    return _embed_frames(inputs.ctx, "dino", model, inputs.edited, inputs.params.batch_size,
                         lambda pixels: model(pixel_values=pixels).last_hidden_state[:, 0])  # fmt: skip


def _embed_frames(ctx: StageContext, role: str, model: Any, frames: np.ndarray, batch: int,
                  features: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """``features`` of the frames, ``batch`` at a time through the role's image processor, float32 on the CPU."""
    processor, parameter = ctx.model(role, "image_processor"), next(model.parameters())
    out = []
    for start in range(0, len(frames), batch):
        pixels = processor(images=list(frames[start : start + batch]), return_tensors="pt").pixel_values
        with torch.inference_mode():
            out.append(features(pixels.to(parameter.device, parameter.dtype)).float().cpu())
    return torch.cat(out)


def _audio_visual(inputs: MetricInputs) -> np.ndarray:
    audio = inputs.ctx.array("audio", "embeddings", "float32")
    width = image_width(inputs.ctx.model_config("clip") or {})
    if width != audio.shape[1]:  # before CLIP embeds anything
        raise SpecError(f"stage {inputs.ctx.call.stage_id!r}: the audio embeddings are {audio.shape[1]}-wide but the clip "
                        f"role embeds images {width}-wide; audio_visual needs the audio encoder's image space "
                        "(CLIP ViT-B/32 for the CLIP-aligned encoders)")  # fmt: skip
    if "mask" not in inputs.ctx.call.inputs:
        return evaluation.source_similarity(inputs.clip_images("edited"), audio)
    region = _blacked(inputs.edited, inputs.mask)
    images = inputs.once("clip-region", lambda: _clip_images(inputs.ctx, region, inputs.params.batch_size))
    return evaluation.source_similarity(images, audio)


def _outside(inputs: MetricInputs) -> np.ndarray:
    return ~inputs.mask


def _blacked(frames: np.ndarray, keep: np.ndarray) -> np.ndarray:
    return np.where(keep[..., None], frames, 0).astype(np.uint8)


Implementation = Callable[[MetricInputs], np.ndarray]
IMPLEMENTATIONS: dict[str, Implementation] = {
    "psnr": lambda m: psnr(m.source, m.edited),
    "ssim": lambda m: ssim(m.source, m.edited),
    "lpips": lambda m: m.lpips(m.source, m.edited),
    "psnr_outside": lambda m: evaluation.masked_psnr(m.source, m.edited, _outside(m)),
    "psnr_inside": lambda m: evaluation.masked_psnr(m.source, m.edited, m.mask),
    "ssim_outside": lambda m: evaluation.masked_ssim(m.source, m.edited, _outside(m)),
    "ssim_inside": lambda m: evaluation.masked_ssim(m.source, m.edited, m.mask),
    "lpips_outside": lambda m: m.lpips(_blacked(m.source, _outside(m)), _blacked(m.edited, _outside(m))),
    "lpips_inside": lambda m: m.lpips(_blacked(m.source, m.mask), _blacked(m.edited, m.mask)),
    "clip_text": lambda m: evaluation.text_alignment(m.clip_images("edited"), m.clip_text(m.params.prompt)),
    "clip_consistency_consecutive": lambda m: evaluation.consecutive_consistency(m.clip_images("edited")),
    "clip_consistency_all_pairs": lambda m: evaluation.all_pairs_consistency(m.clip_images("edited")),
    "clip_source": lambda m: evaluation.source_similarity(m.clip_images("edited"), m.clip_images("source")),
    "frame_accuracy": lambda m: evaluation.frame_accuracy(m.clip_images("edited"), m.clip_text(m.params.prompt),
                                                          m.clip_text(m.params.source_prompt)),
    "warp_error": lambda m: evaluation.warp_error(m.edited, m.ctx.input("flow")["forward"][:],
                                                  m.ctx.input("flow")["occluded_forward"][:]),
    "flicker": lambda m: evaluation.flicker(m.edited),
    "dino_consistency": lambda m: evaluation.subject_consistency(_dino(m)),
    "audio_visual": _audio_visual,
}


def _compute(ctx: StageContext) -> Metrics:
    p: ComputeMetricsParams = ctx.call.stage.params
    inputs = MetricInputs(ctx, p, ctx.array("source", "frames"), ctx.array("edited", "frames"))
    means, per_frame = {}, {}
    for name in p.metrics:
        values = np.asarray(IMPLEMENTATIONS[name](inputs), np.float64)
        dims = ("frame",) if METRICS[name].per == "frame" else ("pair",)
        ctx.writer.write_array(name, values.astype(np.float32), dims=dims, dtype=np.float32)
        finite = values[np.isfinite(values)]
        means[name] = round(float(finite.mean()), 6) if finite.size else float("nan")
        per_frame[name] = values
    _publish(ctx, inputs.source, inputs.edited, means, per_frame)
    return Metrics(metrics=means, better={name: METRICS[name].better for name in means},
                   descriptions={name: METRICS[name].description for name in means})  # fmt: skip


def _publish(
    ctx: StageContext, source: np.ndarray, edited: np.ndarray, means: dict[str, float], per_frame: dict[str, np.ndarray]
) -> None:
    """The contact sheet (source frames above, edited frames below) and the metrics per frame (a pair's value on the
    row of its first frame)."""
    shown = spread(len(source), SHEET_FRAMES)
    labels = frame_labels(ctx.store, ctx.input("source"), shown)
    sheet = ctx.picture("contact-sheet", contact_sheet(source[shown], rows=[edited[shown]], labels=labels))

    def cell(values: np.ndarray, i: int) -> str:
        return f"{values[i]:.3f}" if i < len(values) else ""

    rows = [(label, *(cell(per_frame[m], i) for m in means)) for label, i in zip(labels, shown, strict=True)]
    lines = [
        "**source** (top) **and edited** (bottom)",
        "",
        sheet,
        "",
        markdown_table(("", *means), [("mean", *(f"{v:.3f}" for v in means.values())), *rows]),
    ]
    ctx.publish("\n".join(lines))


DINO_TYPES = ("vit", "dinov2", "dinov2_with_registers", "dinov3_vit")


@stage_check("compute_metrics")
def _check(ctx: PreflightContext) -> None:
    """Refuses, before any model loads, a clip role that is not CLIP with both towers and a dino role that is not a
    ViT (a model of another type fits the family, so the graph may pick it; a supervised ViT cannot be told from
    DINO's by its config)."""
    if ctx.model_family("clip") is not None:
        kind = (ctx.model_config("clip") or {}).get("model_type")
        if kind != "clip":
            raise ValueError(f"the clip role is a {kind!r} model; the CLIP metrics take CLIP with both towers, such as "
                             "openai/clip-vit-base-patch32 (name it with `models: {clip: ...}`)")  # fmt: skip
    if ctx.model_family("dino") is not None:
        kind = (ctx.model_config("dino") or {}).get("model_type")
        if kind not in DINO_TYPES:
            raise ValueError(f"the dino role is a {kind!r} model; dino_consistency takes a DINO ViT such as "
                             "facebook/dino-vitb16 (name it with `models: {dino: ...}`)")  # fmt: skip
