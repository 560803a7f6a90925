"""FateZero's record and fuse controllers on the tiny bundle's UNet (methods.md 1.14)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reelflow.core.attention.processor import (
    SelfAttention,
    install_frame_processors,
    restore_default_processors,
    set_num_frames,
)
from reelflow.core.editing.fatezero import FusionController, FusionPlan, RecordingController, SelfTokens, recorded_steps
from reelflow.core.editing.prompt_to_prompt import equalizer, refine_mapper, word_token_indices
from reelflow.core.inversion.ddim import inversion_timesteps
from reelflow.core.models import load_component
from reelflow.core.sampling.ddim import denoising_timesteps
from reelflow.core.text import encode_prompts
from reelflow.core.tiny import tiny_tokenizer

FRAMES = 3
PROMPT = "a cat walking on a street"


@pytest.fixture(scope="module")
def parts(tiny_bundle: Path) -> dict:
    names = ("unet", "tokenizer", "text_encoder", "scheduler")
    return {name: load_component(str(tiny_bundle), name) for name in names}


def run_unet(parts: dict, latents: torch.Tensor, controller, prompt: str = PROMPT) -> torch.Tensor:
    unet = parts["unet"]
    embeddings = encode_prompts(parts["tokenizer"], parts["text_encoder"], [prompt]).expand(latents.shape[0], -1, -1)
    install_frame_processors(unet, frame_keys=("mid",), min_channels=0, controller=controller)
    try:
        set_num_frames(unet, FRAMES)
        with torch.no_grad():
            return unet(latents, 500, encoder_hidden_states=embeddings).sample
    finally:
        restore_default_processors(unet)


def record(parts: dict, latents: torch.Tensor, max_query_len: int = 4096) -> tuple[dict, dict]:
    maps, layers = {}, {}

    def sink(step: int, layer: str, is_cross: bool, recorded) -> None:
        maps[layer] = recorded if isinstance(recorded, SelfTokens) else recorded.clone()
        query_len = (recorded.query if isinstance(recorded, SelfTokens) else recorded).shape[2]
        layers[layer] = (is_cross, query_len)

    run_unet(parts, latents, RecordingController(max_query_len, {0}, sink))
    return maps, layers


def replay_plan(parts: dict) -> FusionPlan:
    mapper, alphas = refine_mapper(parts["tokenizer"], PROMPT, PROMPT)
    return FusionPlan(
        num_steps=1, cross_window=torch.ones(1, dtype=torch.bool), self_window=torch.ones(1, dtype=torch.bool),
        mapper=mapper, alphas=alphas,
    )  # fmt: skip


def test_recording_then_replaying_everything_reproduces_the_output(parts: dict) -> None:
    z = torch.randn(FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = run_unet(parts, z, None)
    maps, layers = record(parts, z)
    assert layers, "the recorder saw the attention layers"
    fusion = FusionController(replay_plan(parts), source=lambda step: maps, layers=layers)
    fusion.begin_step(0)
    replayed = run_unet(parts, z, fusion)
    torch.testing.assert_close(replayed, plain, rtol=1e-5, atol=1e-6)  # float32 rounding: kernels sum in their own order


def test_replaying_another_clips_maps_changes_the_output(parts: dict) -> None:
    z = torch.randn(FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    other = torch.randn(FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    maps, layers = record(parts, other)
    fusion = FusionController(replay_plan(parts), source=lambda step: maps, layers=layers)
    fusion.begin_step(0)
    assert not torch.allclose(run_unet(parts, z, fusion), run_unet(parts, z, None), atol=1e-4)


def test_recorder_keeps_only_short_queries_and_one_map_per_attention_layer(parts: dict) -> None:
    z = torch.randn(FRAMES, 4, 8, 8)
    all_maps, _ = record(parts, z)
    attention_layers = [n for n in parts["unet"].attn_processors if n.endswith(("attn1.processor", "attn2.processor"))]
    assert len(all_maps) == len(attention_layers)
    short, layers = record(parts, z, max_query_len=16)
    assert short and all(q <= 16 for _, q in layers.values())
    assert set(short) < set(all_maps)
    for name, recorded in all_maps.items():
        if name.endswith("attn2"):
            assert recorded.shape[0] == FRAMES and recorded.shape[-1] == 77
            torch.testing.assert_close(recorded.sum(-1), torch.ones_like(recorded.sum(-1)))
        else:  # self-attention: every frame's queries, and the keys of the one key frame ('mid',) only
            assert isinstance(recorded, SelfTokens) and recorded.query.shape[0] == FRAMES
            assert recorded.key.shape[0] == 1 and recorded.key_frames.tolist() == [(FRAMES - 1) // 2]
            assert recorded.key.shape[1:] == recorded.query.shape[1:]


@pytest.mark.parametrize("steps", [5, 50])
def test_edit_step_reads_the_inversion_step_of_the_same_timestep(parts: dict, steps: int) -> None:
    inverted = inversion_timesteps(parts["scheduler"], steps).tolist()
    denoised = denoising_timesteps(parts["scheduler"], steps).tolist()
    requested: list[int] = []

    def source(step: int) -> dict:
        requested.append(step)
        return {}

    window = torch.ones(steps, dtype=torch.bool)
    fusion = FusionController(FusionPlan(steps, window, window), source=source, layers={})
    for i in range(steps):
        fusion.begin_step(i)
        assert inverted[requested[-1]] == denoised[i]
    assert requested == list(range(steps - 1, -1, -1))


def test_steps_outside_every_window_load_no_maps() -> None:
    requested: list[int] = []
    cross = torch.tensor([True, True, False, False])
    fusion = FusionController(FusionPlan(4, cross, torch.zeros(4, dtype=torch.bool)), lambda k: requested.append(k) or {}, {})
    for i in range(4):
        fusion.begin_step(i)
    assert requested == [3, 2]
    assert fusion.plan.source_steps() == requested, "the reader prefetches the steps in the order they are read"


@pytest.mark.parametrize(("fraction", "expected"), [(1.0, [0, 1, 2, 3, 4]), (0.6, [2, 3, 4]), (0.5, [2, 3, 4]), (0.1, [4])])
def test_recorded_steps_cover_the_replace_windows(fraction: float, expected: list[int]) -> None:
    assert recorded_steps(5, fraction) == expected


def tokens_call(rows: int, generator: torch.Generator, indices: torch.Tensor | None = None) -> SelfAttention:
    q, k, v = (torch.randn(rows, 2, 16, 8, generator=generator) for _ in range(3))
    return SelfAttention(q, k, v, indices, 8**-0.5, FRAMES)


def test_fusion_touches_only_the_conditional_half_of_a_guidance_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    stored = SelfTokens.of(tokens_call(FRAMES, generator))
    call = tokens_call(2 * FRAMES, generator)
    window = torch.ones(1, dtype=torch.bool)
    fusion = FusionController(FusionPlan(1, window, window), source=lambda k: {"l": stored}, layers={"l": (False, 16)})
    fusion.begin_step(0)
    out = fusion.attend(call, layer="l")
    torch.testing.assert_close(out[:FRAMES], call.attend()[:FRAMES], rtol=0, atol=1e-6)
    source_probs = (stored.query @ stored.key.transpose(-1, -2) * call.scale).softmax(-1)
    torch.testing.assert_close(out[FRAMES:], source_probs @ call.value[FRAMES:], rtol=0, atol=1e-5)


def test_self_attention_blend_keeps_the_edit_inside_the_mask_and_the_source_outside(parts: dict) -> None:
    tokenizer = parts["tokenizer"]
    cat = 2  # "a cat ...": BOS, a, cat
    cross = torch.zeros(FRAMES, 2, 16, 77)
    cross[:, :, :8, cat] = 1.0  # the word attends to the top half of a 4x4 map
    generator = torch.Generator().manual_seed(1)
    stored, call = SelfTokens.of(tokens_call(FRAMES, generator)), tokens_call(FRAMES, generator)
    window = torch.ones(1, dtype=torch.bool)
    plan = FusionPlan(1, window, window, blend_tokens=[cat], blend_threshold=0.3, blend_resolution=4)
    maps = {"self": stored, "cross": cross}
    fusion = FusionController(plan, source=lambda k: maps, layers={"self": (False, 16), "cross": (True, 16)})
    fusion.begin_step(0)
    out = fusion.attend(call, layer="self")
    mask = fusion.first_mask.reshape(FRAMES, 16)
    assert mask[:, :8].all(), "the word's region (dilated by the 3x3 max-pool) is edited"
    assert not mask[:, -4:].any(), "rows beyond the dilation keep the source"
    source = F.scaled_dot_product_attention(stored.query, stored.gathered_key(), call.value, scale=call.scale)
    expected = torch.where(mask[:, None, :, None].bool(), call.attend(), source)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert tokenizer.decode([tokenizer("a cat").input_ids[cat]]).strip() == "cat"


def test_blend_masks_follow_non_square_grids() -> None:
    """A 6x8 latent grid: the 3x4 maps of the word's left column make a mask in that column at every level."""
    cat = 2
    cross = torch.zeros(FRAMES, 2, 12, 77)
    cross[:, :, [0, 4, 8], cat] = 1.0  # column 0 of a 3x4 grid
    window = torch.ones(1, dtype=torch.bool)
    plan = FusionPlan(1, window, window, blend_tokens=[cat], blend_threshold=0.5, latent_shape=(6, 8))
    fusion = FusionController(plan, source=lambda k: {"cross": cross}, layers={"cross": (True, 12)})
    fusion.begin_step(0)
    latent_mask = fusion.mask(48).reshape(FRAMES, 6, 8)
    assert fusion.first_mask.shape == (FRAMES, 3, 4)
    assert fusion.first_mask[:, :, :2].all() and not fusion.first_mask[:, :, 2:].any(), "the max-pool dilates by one"
    assert latent_mask[:, :, :4].all() and not latent_mask[:, :, 4:].any()
    with pytest.raises(ValueError, match="not the 6x8 latent grid"):
        plan.grid(10)


def test_latent_blending_unites_source_and_accumulated_target_masks() -> None:
    cat, dog = 2, 3
    source = torch.zeros(FRAMES, 2, 16, 77)
    source[:, :, :2, cat] = 1.0  # top-left corner of a 4x4 grid
    edit = torch.zeros(FRAMES, 2, 16, 77)
    edit[:, :, -2:, dog] = 1.0  # bottom-right corner
    latent_window = torch.tensor([False, True, True, False])
    never = torch.zeros(4, dtype=torch.bool)
    plan = FusionPlan(4, never, never, blend_tokens=[cat], blend_threshold=0.5, latent_window=latent_window,
                      target_tokens=[dog])  # fmt: skip
    fusion = FusionController(plan, source=lambda k: {"cross": source}, layers={"cross": (True, 16)})
    for step in range(4):
        fusion.begin_step(step)
        assert fusion.wants("cross", True, 16) == (step <= 2), "target maps are summed from step 0 to the window's end"
        out = fusion(edit, layer="cross", is_cross=True, num_frames=FRAMES)
        assert out is edit, "outside the cross window nothing is fused"
        if step == 1:
            mask = fusion.latent_mask(16).reshape(FRAMES, 4, 4)
            assert mask[:, 0, 0].all() and mask[:, 3, 3].all(), "source object and target object both kept"
            assert not mask[:, 0, 3].any() and not mask[:, 3, 0].any()
    torch.testing.assert_close(fusion.target_maps["cross"], 3 * edit)


def test_reweighting_scales_the_target_words_cross_attention_column_inside_the_cross_window() -> None:
    """P2P's Reweight through the controller: the equaliser multiplies the target word's fused column
    by its factor, leaves every other column as the controller without it makes them, and is off
    outside the cross window (methods.md 1.7)."""
    tokenizer, target = tiny_tokenizer(), "a painting of a cat walking on a street"
    mapper, alphas = refine_mapper(tokenizer, PROMPT, target)
    painting = word_token_indices(tokenizer, target, "painting")
    others = [j for j in range(77) if j not in painting]
    generator = torch.Generator().manual_seed(0)
    source = torch.rand(FRAMES, 2, 16, 77, generator=generator).softmax(-1)
    probs = torch.rand(2 * FRAMES, 2, 16, 77, generator=generator).softmax(-1)

    def controller(scales: torch.Tensor | None) -> FusionController:
        cross, never = torch.tensor([True, False]), torch.zeros(2, dtype=torch.bool)
        plan = FusionPlan(2, cross, never, mapper=mapper, alphas=alphas, equalizer=scales)
        return FusionController(plan, source=lambda k: {"cross": source}, layers={"cross": (True, 16)})

    plain, weighted = controller(None), controller(equalizer(tokenizer, target, ["painting"], [10.0]))
    for step in range(2):
        plain.begin_step(step)
        weighted.begin_step(step)
        a = plain(probs, layer="cross", is_cross=True, num_frames=FRAMES)
        b = weighted(probs, layer="cross", is_cross=True, num_frames=FRAMES)
        if step == 0:
            assert (a[FRAMES:, ..., painting] > 0).all()
            torch.testing.assert_close(b[FRAMES:, ..., painting], 10 * a[FRAMES:, ..., painting], rtol=0, atol=0)
            torch.testing.assert_close(b[..., others], a[..., others], rtol=0, atol=0)
            torch.testing.assert_close(b[:FRAMES], probs[:FRAMES], rtol=0, atol=0)
        else:
            assert a is probs and b is probs, "outside the cross window nothing is fused or reweighted"
