"""invert_latents and denoise_latents (FateZero): the two stages around the stored attention."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import zarr

from reelflow.core.attention.processor import install_frame_processors
from reelflow.core.editing.fatezero import (
    FusionController,
    FusionPlan,
    RecordingController,
    SelfTokens,
    fused_word_maps,
    fusion_plan,
    recorded_steps,
    word_heatmaps,
)
from reelflow.core.editing.fatezero_edit import LatentBlender, fatezero_edit, fatezero_invert
from reelflow.core.editing.prompt_to_prompt import word_token_indices
from reelflow.core.inversion.ddim import inversion_timesteps
from reelflow.core.text import encode_prompts
from reelflow.schemas.calls import StageCall
from reelflow.schemas.fatezero import DdimAttentionInversion, FateZeroParams
from reelflow.schemas.kinds import Latents
from reelflow.schemas.refs import ArtifactRef
from reelflow.storage.attention import ATTENTION, KEYS, QUERIES, AttentionReader, AttentionWriter, StoredTokens
from reelflow.tasks.artifacts import contact_sheet, markdown_table, overlay, spread
from reelflow.tasks.frames import decoded_frames, frame_labels
from reelflow.tasks.models import model_lock
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

LATENT_DIMS = ("level", "frame", "latent_channel", "y", "x")  # level k: after k inversion steps (0: clean)
MASK_DIMS = ("frame", "mask_y", "mask_x")  # the blend mask's grid, coarser than the latents'
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


@stage_task("invert_latents", "fatezero")
def invert_latents(call: StageCall) -> ArtifactRef:
    """DDIM inversion: latents of every step ``(T+1, F, 4, h, w)``, cross-attention maps ``attention/{layer}``,
    self-attention queries ``queries/{layer}`` and key-frame keys ``keys/{layer}`` (see reelflow.storage.attention).

    Resumable: each step is marked done once its latents and attention records are stored, and an attempt
    after a crash continues from the last stored step.
    """
    return run_stage(call, _invert, resumable=True)


def _invert(ctx: StageContext) -> DdimAttentionInversion:
    p = ctx.call.stage.params
    z0 = torch.from_numpy(ctx.array("latents", "latents", "float32"))
    unet, (tokenizer, text_encoder) = _models(ctx)
    scheduler = ctx.model("unet", "scheduler", cls="DDIMScheduler")
    steps, embeddings = p.num_steps, encode_prompts(tokenizer, text_encoder, [p.source_prompt])
    cross_steps, self_steps = recorded_steps(steps, p.record_fraction), recorded_steps(steps, p.self_fraction)
    latents = ctx.writer.create_array(
        "latents", shape=(steps + 1, *z0.shape), dtype=np.float32, dims=LATENT_DIMS, chunks=(1, *z0.shape)
    )
    start = next((k for k in range(steps) if not ctx.writer.is_done(f"step-{k}")), steps)
    latents[0] = z0.numpy()
    maps = AttentionWriter(ctx.writer, steps)
    recorder = RecordingController(p.max_query_len, set(cross_steps), lambda k, layer, cross, recorded: maps.write(
        k, layer, cross, _to_store(recorded)), self_steps=set(self_steps))
    ctx.progress.start(steps - start)
    ctx.steps.start(steps, "DDIM inversion")
    on_step, started = _StepStream(latents, maps, ctx), time.perf_counter()
    try:
        with frame_attention(unet, frame_keys=p.frame_keys, min_channels=p.min_channels, controller=recorder):
            z_start = torch.from_numpy(np.asarray(latents[start]))
            fatezero_invert(unet, z_start, embeddings, scheduler, steps, recorder, on_step=on_step, start=start)
    except BaseException:
        maps.abort()
        raise
    maps.close()
    on_step.finish()
    _record_store(ctx, maps, cross_steps, self_steps, time.perf_counter() - started, resumed_from=start)
    return DdimAttentionInversion(
        source_prompt=p.source_prompt, num_steps=steps, timesteps=inversion_timesteps(scheduler, steps).tolist(),
        recorded_steps=sorted(set(cross_steps) | set(self_steps)), recorded_cross_steps=cross_steps,
        recorded_self_steps=self_steps, frame_keys=list(p.frame_keys), min_channels=p.min_channels,
        layers=maps.layers,
    )  # fmt: skip


def _to_store(recorded: torch.Tensor | SelfTokens) -> torch.Tensor | StoredTokens:
    """A layer's record on the host for the attention writer, which casts it to float16 in its own thread."""
    if isinstance(recorded, SelfTokens):
        return StoredTokens(_host(recorded.query), _host(recorded.key), recorded.key_frames.tolist(), recorded.indices.tolist())
    return _host(recorded)


def _host(tensor: torch.Tensor) -> torch.Tensor:
    """On the CPU, as is; from a GPU, cast to float16 first (half the copy); bfloat16, which numpy lacks, too."""
    tensor = tensor.detach()
    if tensor.is_cuda or tensor.dtype == torch.bfloat16:
        tensor = tensor.to(torch.float16)
    return tensor.cpu()


class _StepStream:
    """``on_step`` of the inversion: stores ``z_{k+1}`` and marks step ``k`` done once its maps are stored too."""

    def __init__(self, latents: zarr.Array, maps: AttentionWriter, ctx: StageContext) -> None:
        self.latents, self.maps, self.ctx, self.pending = latents, maps, ctx, []

    def __call__(self, k: int, t: int, z: torch.Tensor) -> None:
        self.latents[k + 1] = z.cpu().numpy()
        self.ctx.steps.keep(k, z, f"step {k + 1} · t={int(t)}")
        self.pending.append(k)
        while self.pending and self.maps.flushed(self.pending[0]):
            self.ctx.writer.mark_done(f"step-{self.pending.pop(0)}")
        self.ctx.progress.advance()

    def finish(self) -> None:
        """After the maps writer closed: every step is stored."""
        for k in self.pending:
            self.ctx.writer.mark_done(f"step-{k}")


def _record_store(
    ctx: StageContext, maps: AttentionWriter, cross_steps: list[int], self_steps: list[int], seconds: float,
    *, resumed_from: int,
) -> None:  # fmt: skip
    """The attention store's sizes and timings, in the attrs and the UI."""
    groups = [group for group in (ATTENTION, QUERIES, KEYS) if group in ctx.writer.group]
    stored = sum(ctx.store.size(f"{_rel(ctx)}/{group}") for group in groups)
    _publish_inversion(ctx, maps, stored, cross_steps, self_steps, seconds)
    ctx.record(attention_store={"raw_float32_bytes": maps.raw_bytes, "stored_bytes": stored,
                                "write_seconds": round(maps.write_seconds, 4), "inversion_seconds": round(seconds, 4),
                                "resumed_from_step": resumed_from})  # fmt: skip


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
    ctx.publish(f"**attention store** of the inversion of '{ctx.call.stage.params.source_prompt}'\n\n"
                + markdown_table(("attention store", "measured"), rows))


def _rel(ctx: StageContext) -> str:
    """The artifact's path relative to the store root while it is being written."""
    return ctx.writer.path[len(ctx.store.root) + 1 :]


def _models(ctx: StageContext) -> tuple[Any, tuple[Any, Any]]:
    unet = ctx.model("unet")
    return unet, (ctx.model("text_encoder", "tokenizer"), ctx.model("text_encoder"))


@stage_task("denoise_latents", "fatezero")
def denoise_latents(call: StageCall) -> ArtifactRef:
    """Edited latents ``(F, 4, h, w)`` and, for local edits, the blend mask ``(F, r, r)``."""
    return run_stage(call, _denoise)


def _denoise(ctx: StageContext) -> Latents:
    p: FateZeroParams = ctx.call.stage.params
    inversion, attrs = ctx.input("inversion"), ctx.attrs("inversion")
    z = torch.from_numpy(np.asarray(inversion["latents"][-1]))
    unet, (tokenizer, text_encoder) = _models(ctx)
    scheduler = ctx.model("unet", "scheduler", cls="DDIMScheduler")
    plan, fusion = _fusion_plan(p, tokenizer, attrs.source_prompt, attrs.num_steps, latent_shape=tuple(z.shape[-2:]))
    controller, reader = _fusion_controller(inversion, attrs, plan, unet.device)
    embeddings = encode_prompts(tokenizer, text_encoder, [p.negative_prompt, p.target_prompt])
    blender = LatentBlender(controller, _inversion_latent(inversion)) if p.blend_latents else None
    ctx.progress.start(attrs.num_steps)
    ctx.steps.start(attrs.num_steps, "denoising")
    started = time.perf_counter()

    def on_step(i: int, t: int, latents: torch.Tensor) -> None:
        ctx.progress.advance()
        ctx.steps.keep(i, latents, f"step {i + 1} · t={int(t)}")

    with reader, frame_attention(unet, frame_keys=tuple(attrs.frame_keys), min_channels=attrs.min_channels,
                                 controller=controller):  # fmt: skip
        z = fatezero_edit(
            unet, z, embeddings, scheduler, attrs.num_steps, controller, p.guidance_scale, blender=blender,
            inverted_timesteps=attrs.timesteps, on_step=on_step,
        )  # fmt: skip
    ctx.writer.write_array("latents", z.cpu().numpy(), dims=("frame", "latent_channel", "y", "x"), dtype=np.float16)
    _publish_edit(ctx, p, fusion, _write_attention(ctx, controller, tokenizer, attrs.source_prompt, p))
    ctx.record(source_prompt=attrs.source_prompt, target_prompt=p.target_prompt, fusion=fusion, num_steps=attrs.num_steps,
               attention_read_seconds=round(reader.read_seconds, 4), attention_wait_seconds=round(reader.wait_seconds, 4),
               denoise_seconds=round(time.perf_counter() - started, 4))  # fmt: skip
    return Latents()


def _fusion_plan(
    p: FateZeroParams, tokenizer: Any, source_prompt: str, steps: int, *, latent_shape: tuple[int, int]
) -> tuple[FusionPlan, str]:
    """The edit's plan from its params; warns when a replace edit falls back to refine."""
    plan, fusion = fusion_plan(
        tokenizer, source_prompt, p.target_prompt, steps, latent_shape=latent_shape,
        cross_replace_steps=p.cross_replace_steps, self_replace_steps=p.self_replace_steps, replace=p.replace,
        reweight=p.reweight, blend_words=p.blend_words, blend_threshold=p.blend_threshold,
        blend_resolution=p.blend_resolution, blend_latents=p.blend_latents,
    )  # fmt: skip
    if p.replace and fusion != "replace":
        logger.warning("replace needs prompts with the same word count; using refine (as FateZero)")
    return plan, fusion


def _fusion_controller(
    inversion: zarr.Group, attrs: DdimAttentionInversion, plan: FusionPlan, device: torch.device
) -> tuple[FusionController, AttentionReader]:
    """The controller of one edit, reading the inversion's maps through a prefetching reader (the MapSource)."""
    layers = {name: (info.is_cross, info.query_len) for name, info in attrs.layers.items()}
    pin = device.type == "cuda"

    def to_tensor(maps: np.ndarray) -> torch.Tensor:
        # Pinned in the prefetch thread, so the copy to the GPU in the UNet call can be asynchronous.
        tensor = torch.from_numpy(maps)
        return tensor.pin_memory() if pin else tensor

    steps = {True: attrs.recorded_cross_steps, False: attrs.recorded_self_steps}
    recorded = {name: steps[is_cross] for name, (is_cross, _) in layers.items()}
    reader = AttentionReader(inversion, recorded, plan.source_steps(), transform=to_tensor)

    def source(step: int) -> dict[str, torch.Tensor | SelfTokens]:
        return {name: _from_store(stored) for name, stored in reader(step).items()}

    return FusionController(plan, source, layers), reader


def _from_store(stored: torch.Tensor | StoredTokens) -> torch.Tensor | SelfTokens:
    if isinstance(stored, StoredTokens):
        return SelfTokens(stored.query, stored.key, torch.tensor(stored.key_frames), torch.tensor(stored.frame_indices))
    return stored


def _inversion_latent(inversion: zarr.Group) -> Callable[[int], torch.Tensor]:
    """``k -> z_k`` from the inversion's latents, ``(F, 4, h, w)`` float32."""
    latents = inversion["latents"]
    return lambda k: torch.from_numpy(np.asarray(latents[k]))


SHOWN_WORDS = 3  # words a side in the attention picture


def _publish_edit(ctx: StageContext, p: FateZeroParams, fusion: str, pictures: str | None) -> None:
    lines = [f"**{p.target_prompt}**", "", f"fusion: {fusion}; guidance {p.guidance_scale}; "
             f"cross/self windows {p.cross_replace_steps}/{p.self_replace_steps}"]  # fmt: skip
    ctx.publish("\n".join([*lines, *(["", pictures] if pictures else [])]))


def _write_attention(
    ctx: StageContext, controller: FusionController, tokenizer: Any, source_prompt: str, p: FateZeroParams
) -> str | None:
    """Stores what the edit's attention looked like and returns its picture (None when nothing was fused):

    * ``blend_mask`` ``(F, r, r)``, the first blend mask, and ``word_heatmaps`` ``(W, F, r, r)``, the source
      blend words' maps it came from (local edits);
    * ``source_word_maps`` and ``target_word_maps`` ``(W, F, r, r)``: each word's cross-attention summed over
      the fused steps, source words from the stored inversion, target words from the edit itself; the words
      are the blend words of a local edit, else those one prompt has and the other lacks.

    The picture stands each map over the source frame it describes, a few frames a row, labelled by frame
    number and time, with the colour key.
    """
    rows: list[tuple[str, np.ndarray]] = []
    if controller.first_mask is not None:
        mask = controller.first_mask.cpu().numpy().astype(np.uint8)
        ctx.writer.write_array("blend_mask", mask, dims=MASK_DIMS)
        words = _words(tokenizer, source_prompt, p.blend_words[0])
        maps = word_heatmaps(controller, list(words.values())).numpy()
        ctx.writer.write_array("word_heatmaps", maps, dims=("word", *MASK_DIMS), dtype=np.float16, attrs={"words": list(words)})
        rows.append(("blend mask (1: edited)", mask.astype(np.float32)))
    source_words, target_words = _shown_words(source_prompt, p)
    for side, prompt, chosen in (("source", source_prompt, source_words), ("target", p.target_prompt, target_words)):
        words = _words(tokenizer, prompt, chosen)
        if not words or not controller.shown_maps[side]:
            continue
        maps = fused_word_maps(controller, side, list(words.values())).numpy()
        ctx.writer.write_array(f"{side}_word_maps", maps, dims=("word", *MASK_DIMS), dtype=np.float16,
                               attrs={"words": list(words), "prompt": prompt, "summed_over": "fused steps"})  # fmt: skip
        rows += [(f"{side} '{word}'", heat) for word, heat in zip(words, maps)]
    return _attention_picture(ctx, rows) if rows else None


def _shown_words(source_prompt: str, p: FateZeroParams) -> tuple[list[str], list[str]]:
    if p.blend_words is not None:
        return list(p.blend_words[0]), list(p.blend_words[1])
    source, target = source_prompt.split(), p.target_prompt.split()
    return [w for w in source if w not in target][:SHOWN_WORDS], [w for w in target if w not in source][:SHOWN_WORDS]


def _words(tokenizer: Any, prompt: str, words: list[str]) -> dict[str, list[int]]:
    """Each word's token positions in ``prompt`` (a word the prompt lacks is left out)."""
    found = {}
    for word in dict.fromkeys(words):
        try:
            found[word] = word_token_indices(tokenizer, prompt, word)
        except ValueError:
            continue
    return found


def _attention_picture(ctx: StageContext, rows: list[tuple[str, np.ndarray]]) -> str:
    count = rows[0][1].shape[0]
    shown = spread(count)
    source = decoded_frames(ctx.store, ctx.input("inversion"))
    if source is not None and source["frames"].shape[0] == count:
        frames = np.asarray(source["frames"].oindex[shown])
        sheet = contact_sheet(frames, [overlay(frames, maps[shown]) for _, maps in rows],
                              labels=frame_labels(ctx.store, source, shown), row_labels=["source frames", *(n for n, _ in rows)],
                              key="each word's attention divided by its frame's maximum; the mask is 0 or 1")  # fmt: skip
    else:  # frames from elsewhere: the maps alone
        sheet = contact_sheet(rows[0][1][shown], [maps[shown] for _, maps in rows[1:]], labels=[f"#{i}" for i in shown],
                              row_labels=[n for n, _ in rows])  # fmt: skip
    return "**attention** over the frames it describes\n\n" + ctx.picture("attention", sheet)
