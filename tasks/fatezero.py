"""invert_latents and denoise_latents (FateZero): the two stages around the stored attention."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import zarr

from reelflow.core.attention.processor import install_frame_processors, set_num_frames
from reelflow.core.editing.fatezero import FusionController, FusionPlan, RecordingController, recorded_steps
from reelflow.core.editing.prompt_to_prompt import equalizer, refine_mapper, replace_matrix, step_window, word_token_indices
from reelflow.core.inversion.ddim import ddim_invert, inversion_timesteps
from reelflow.core.sampling.ddim import classifier_free_guidance, ddim_denoise_step, denoising_timesteps
from reelflow.core.text import encode_prompts
from reelflow.schemas.calls import StageCall
from reelflow.schemas.fatezero import FateZeroParams
from reelflow.schemas.refs import ArtifactRef
from reelflow.storage.attention import AttentionReader, AttentionWriter
from reelflow.tasks.artifacts import artifact_key, contact_sheet, publish_markdown
from reelflow.tasks.models import component, model_lock
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

LATENT_DIMS = ("step", "frame", "channel", "y", "x")
logger = logging.getLogger(__name__)


@contextmanager
def frame_attention(unet: Any, *, frame_keys: tuple, min_channels: int, controller: Any) -> Iterator[None]:
    """The shared UNet with FateZero's processors for the duration of one stage, restored after."""
    with model_lock(unet):
        original = dict(unet.attn_processors)
        install_frame_processors(unet, frame_keys=frame_keys, min_channels=min_channels, controller=controller)
        try:
            yield
        finally:
            unet.set_attn_processor(original)


@stage_task("invert_latents")
def invert_latents(call: StageCall) -> ArtifactRef:
    """DDIM inversion: latents of every step ``(T+1, F, 4, h, w)`` and ``attention/{layer}`` maps."""
    return run_stage(call, _invert)


def _invert(ctx: StageContext) -> dict[str, Any]:
    p = ctx.call.stage.params
    z0 = torch.from_numpy(ctx.array("latents", "latents", "float32"))
    unet, text = _models(ctx)
    scheduler = component(ctx.call.model, "scheduler", ctx.settings)
    frames, steps = z0.shape[0], p.num_steps
    embeddings = encode_prompts(*text, [p.source_prompt]).to(unet.dtype).expand(frames, -1, -1)
    cross_steps, self_steps = recorded_steps(steps, p.record_fraction), recorded_steps(steps, p.self_fraction)
    record = sorted(set(cross_steps) | set(self_steps))
    latents = ctx.writer.create_array(
        "latents", shape=(steps + 1, *z0.shape), dtype=np.float32, dims=LATENT_DIMS, chunks=(1, *z0.shape)
    )
    latents[0] = z0.numpy()
    maps = AttentionWriter(ctx.writer, steps)
    recorder = RecordingController(p.max_query_len, set(cross_steps), lambda k, layer, cross, probs: maps.write(
        k, layer, cross, probs.to(torch.float16).cpu().numpy()), self_steps=set(self_steps))
    ctx.progress.start(steps)

    def unet_fn(z: torch.Tensor, t: int, k: int) -> torch.Tensor:
        recorder.step = k
        set_num_frames(unet, frames)
        return unet(z.to(unet.device, unet.dtype), t, encoder_hidden_states=embeddings).sample.float()

    def on_step(k: int, t: int, z: torch.Tensor) -> None:
        latents[k + 1] = z.cpu().numpy()
        ctx.progress.advance()

    started = time.perf_counter()
    try:
        with frame_attention(unet, frame_keys=p.frame_keys, min_channels=p.min_channels, controller=recorder):
            ddim_invert(unet_fn, z0.to(unet.device), scheduler, steps, on_step=on_step)
    except BaseException:
        maps.abort()
        raise
    maps.close()
    stored = sum(ctx.store.size(f"{_rel(ctx)}/attention/{name}") for name in maps.layers) if maps.layers else 0
    seconds = time.perf_counter() - started
    _publish_inversion(ctx, maps, stored, cross_steps, self_steps, seconds)
    return {
        "source_prompt": p.source_prompt,
        "num_steps": steps,
        "timesteps": inversion_timesteps(scheduler, steps).tolist(),
        "recorded_steps": record,
        "recorded_cross_steps": cross_steps,
        "recorded_self_steps": self_steps,
        "frame_keys": list(p.frame_keys),
        "min_channels": p.min_channels,
        "layers": maps.layers,
        "attention_store": {
            "raw_float32_bytes": maps.raw_bytes,
            "stored_bytes": stored,
            "write_seconds": round(maps.write_seconds, 4),
            "inversion_seconds": round(seconds, 4),
        },
    }


def _publish_inversion(
    ctx: StageContext, maps: AttentionWriter, stored: int, cross_steps: list[int], self_steps: list[int], seconds: float
) -> None:
    steps = max(len(set(cross_steps) | set(self_steps)), 1)
    rows = [
        ("layers recorded", f"{len(maps.layers)} ({sum(i['is_cross'] for i in maps.layers.values())} cross)"),
        ("steps recorded (cross / self)", f"{len(cross_steps)} / {len(self_steps)} of {ctx.call.stage.params.num_steps}"),
        ("per step, raw float32", f"{maps.raw_bytes / steps / 2**20:.2f} MiB"),
        ("per step, stored (float16, Blosc-LZ4)", f"{stored / steps / 2**20:.2f} MiB"),
        ("store write time (background)", f"{maps.write_seconds:.2f} s"),
        ("inversion time", f"{seconds:.2f} s"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    url = ctx.store.url_of(ctx.store.artifact_path(ctx.call.stage_type, ctx.call.key))
    publish_markdown(
        f"{ctx.call.stage_id}-{ctx.call.key[:8]}",
        f"### Attention store of `{ctx.call.stage_id}`\n\n| | |\n|---|---|\n{table}\n\nStore: `{url}`",
        description=f"inversion of '{ctx.call.stage.params.source_prompt}'",
    )


def _rel(ctx: StageContext) -> str:
    """The artifact's path relative to the store root while it is being written."""
    return ctx.writer.path[len(ctx.store.root) + 1 :]


def _models(ctx: StageContext) -> tuple[Any, tuple[Any, Any]]:
    model = ctx.call.model
    unet = component(model, "unet", ctx.settings)
    return unet, (component(model, "tokenizer", ctx.settings), component(model, "text_encoder", ctx.settings))


@stage_task("denoise_latents")
def denoise_latents(call: StageCall) -> ArtifactRef:
    """Edited latents ``(F, 4, h, w)`` and, for local edits, the blend mask ``(F, r, r)``."""
    return run_stage(call, _denoise)


def _denoise(ctx: StageContext) -> dict[str, Any]:
    p: FateZeroParams = ctx.call.stage.params
    inversion = ctx.input("inversion")
    steps, z = int(inversion.attrs["num_steps"]), torch.from_numpy(np.asarray(inversion["latents"][-1]))
    unet, (tokenizer, text_encoder) = _models(ctx)
    scheduler = component(ctx.call.model, "scheduler", ctx.settings)
    frames = z.shape[0]
    plan, fusion = fusion_plan(p, tokenizer, inversion.attrs["source_prompt"], steps, latent_shape=tuple(z.shape[-2:]))
    controller, reader = _fusion_controller(inversion, plan, unet.device)
    prompts = encode_prompts(tokenizer, text_encoder, [p.negative_prompt, p.target_prompt]).to(unet.dtype)
    embeddings = torch.cat([prompts[:1].expand(frames, -1, -1), prompts[1:].expand(frames, -1, -1)])
    blender = _LatentBlender(inversion, controller, steps) if p.blend_latents else None
    timesteps = denoising_timesteps(scheduler, steps).tolist()
    if timesteps[::-1] != list(inversion.attrs["timesteps"]):
        raise ValueError("the edit's DDIM timesteps differ from the inversion's; use the inversion's model and scheduler")
    ctx.progress.start(steps)
    started = time.perf_counter()
    with reader, frame_attention(
        unet,
        frame_keys=tuple(inversion.attrs["frame_keys"]),
        min_channels=int(inversion.attrs["min_channels"]),
        controller=controller,
    ):
        for i, t in enumerate(timesteps):
            controller.begin_step(i)
            set_num_frames(unet, frames)
            batch = torch.cat([z, z]).to(unet.device, unet.dtype)
            eps_uncond, eps_cond = unet(batch, t, encoder_hidden_states=embeddings).sample.float().chunk(2)
            eps = classifier_free_guidance(eps_uncond, eps_cond, p.guidance_scale)
            z = ddim_denoise_step(eps, t, z.to(eps.device), scheduler, steps)
            if blender is not None:
                z = blender(i, z)
            ctx.progress.advance()
    ctx.writer.write_array("latents", z.cpu().numpy(), dims=("frame", "channel", "y", "x"), dtype=np.float16)
    pictures = []
    if controller.first_mask is not None:
        mask = controller.first_mask.cpu().numpy().astype(np.uint8)
        ctx.writer.write_array("blend_mask", mask, dims=("frame", "y", "x"))
        words = {w: word_token_indices(tokenizer, inversion.attrs["source_prompt"], w) for w in p.blend_words[0]}
        heat = _write_word_maps(ctx, controller, words)
        pictures = [("blend mask per frame (white: edited)", mask.astype(np.float32))]
        pictures += [(f"source cross-attention of '{word}' per frame", maps) for word, maps in zip(words, heat)]
    _publish_edit(ctx, p, fusion, pictures)
    return {
        "source_prompt": inversion.attrs["source_prompt"],
        "target_prompt": p.target_prompt,
        "fusion": fusion,
        "num_steps": steps,
        "attention_read_seconds": round(reader.read_seconds, 4),
        "attention_wait_seconds": round(reader.wait_seconds, 4),
        "denoise_seconds": round(time.perf_counter() - started, 4),
    }


def fusion_plan(
    p: FateZeroParams, tokenizer: Any, source_prompt: str, steps: int, *, latent_shape: tuple[int, int]
) -> tuple[FusionPlan, str]:
    """Turn an edit's params into per-step windows and token maps; also says which fusion was used."""
    plan = FusionPlan(
        num_steps=steps,
        cross_window=step_window(steps, p.cross_replace_steps),
        self_window=step_window(steps, p.self_replace_steps),
        blend_threshold=p.blend_threshold,
        blend_resolution=p.blend_resolution or max(1, latent_shape[1] // 4),
        latent_shape=latent_shape,
    )
    fusion = "refine"
    if p.replace and len(source_prompt.split()) == len(p.target_prompt.split()):
        plan.replace, fusion = replace_matrix(tokenizer, source_prompt, p.target_prompt), "replace"
    else:
        if p.replace:
            logger.warning("replace needs prompts with the same word count; using refine (as FateZero)")
            fusion = "refine (replace needs the same word count)"
        plan.mapper, plan.alphas = refine_mapper(tokenizer, source_prompt, p.target_prompt)
    if p.reweight:
        plan.equalizer = equalizer(tokenizer, p.target_prompt, list(p.reweight), list(p.reweight.values()))
    if p.blend_words is not None:
        plan.blend_tokens = [i for w in p.blend_words[0] for i in word_token_indices(tokenizer, source_prompt, w)]
    if p.blend_latents:
        # FateZero's counter is the step number plus one and blends while it is in (0.2T, 0.8T).
        window = torch.zeros(steps, dtype=torch.bool)
        window[int(0.2 * steps) : max(int(0.2 * steps), int(0.8 * steps) - 1)] = True
        plan.latent_window = window
        plan.target_tokens = [i for w in p.blend_words[1] for i in word_token_indices(tokenizer, p.target_prompt, w)]
    return plan, fusion


def _fusion_controller(
    inversion: zarr.Group, plan: FusionPlan, device: torch.device
) -> tuple[FusionController, AttentionReader]:
    layers = {name: (info["is_cross"], info["query_len"]) for name, info in inversion.attrs["layers"].items()}
    active = [i for i in range(plan.num_steps) if plan.cross_window[i] or plan.self_window[i]]
    order = [plan.num_steps - 1 - i for i in active]
    pin = device.type == "cuda"

    def to_tensor(maps: np.ndarray) -> torch.Tensor:
        # Pinned in the prefetch thread, so the copy to the GPU in the UNet call can be asynchronous.
        tensor = torch.from_numpy(maps)
        return tensor.pin_memory() if pin else tensor

    steps = {True: inversion.attrs["recorded_cross_steps"], False: inversion.attrs["recorded_self_steps"]}
    recorded = {name: steps[is_cross] for name, (is_cross, _) in layers.items()}
    reader = AttentionReader(inversion, recorded, order, transform=to_tensor)
    return FusionController(plan, reader, layers), reader


class _LatentBlender:
    """FateZero's optional latent blending (methods.md 1.9): on the steps of the plan's latent window,
    keep the inversion's latent of the same noise level outside the union of the source and target
    blend-word masks."""

    def __init__(self, inversion: zarr.Group, controller: FusionController, steps: int) -> None:
        self.latents, self.controller, self.steps = inversion["latents"], controller, steps

    def __call__(self, i: int, z: torch.Tensor) -> torch.Tensor:
        window = self.controller.plan.latent_window
        if window is None or not window[i]:
            return z
        h, w = z.shape[-2:]
        mask = self.controller.latent_mask(h * w).reshape(z.shape[0], 1, h, w).to(z)
        reference = torch.from_numpy(np.asarray(self.latents[self.steps - 1 - i])).to(z)
        return reference + mask * (z - reference)


def _publish_edit(ctx: StageContext, p: FateZeroParams, fusion: str, pictures: list[tuple[str, np.ndarray]]) -> None:
    lines = [f"### `{ctx.call.stage_id}`: {p.target_prompt}", "", f"fusion: {fusion}; guidance {p.guidance_scale}; "
             f"cross/self windows {p.cross_replace_steps}/{p.self_replace_steps}"]  # fmt: skip
    for title, frames in pictures:
        lines += ["", f"**{title}**", "", ctx.picture(artifact_key(title), contact_sheet(frames))]
    publish_markdown(f"{ctx.call.stage_id}-{ctx.call.key[:8]}", "\n".join(lines), description=p.target_prompt)


def _write_word_maps(ctx: StageContext, controller: FusionController, words: dict[str, list[int]]) -> np.ndarray:
    """Each source blend word's cross-attention at the first fused step, normalised per frame, ``(W, F, r, r)``."""
    per_word = []
    for tokens in words.values():
        heat = torch.stack([m.mean(dim=1)[..., tokens].sum(-1) for m in controller.first_maps]).mean(0)
        heat = heat.reshape(-1, *controller.plan.grid(heat.shape[-1]))
        per_word.append(heat / heat.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12))
    maps = torch.stack(per_word).cpu().numpy().astype(np.float32)
    ctx.writer.write_array(
        "word_heatmaps", maps, dims=("word", "frame", "y", "x"), dtype=np.float16, attrs={"words": list(words)}
    )
    return maps
