"""FateZero replayed from stored queries and keys equals FateZero replayed from stored maps.

The maps path (the reference's design: materialise softmax(Q K^T / sqrt(d)) and store it) lives here
only, as the reference the tokens path is checked against.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention

from reelflow.core.attention.processor import (
    SelfAttention,
    frame_indices,
    install_frame_processors,
    restore_default_processors,
    set_num_frames,
)
from reelflow.core.editing.fatezero import FusionController, FusionPlan, RecordingController, SelfTokens, fusion_plan
from reelflow.core.editing.fatezero_edit import fatezero_edit, fatezero_invert
from reelflow.core.models import load_component
from reelflow.core.text import encode_prompts

FRAMES, HEADS, TOKENS, DIM = 4, 2, 16, 8


def probs(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    return (query @ key.transpose(-1, -2) * scale).softmax(-1)


def random_call(rows: int, keys: tuple, generator: torch.Generator) -> SelfAttention:
    q, k, v = (torch.randn(rows, HEADS, TOKENS, DIM, generator=generator, dtype=torch.float64).float() for _ in range(3))
    indices = frame_indices(keys, FRAMES) if keys else None
    return SelfAttention(q, k, v, indices, DIM**-0.5, FRAMES)


@pytest.mark.parametrize("keys", [(), ("mid",), ("self", "mid"), ("first", "previous")])
@pytest.mark.parametrize("blend", [False, True])
def test_replaying_from_queries_and_keys_equals_replaying_from_maps(keys: tuple, blend: bool) -> None:
    generator = torch.Generator().manual_seed(len(keys) + 10 * blend)
    source_call, edit_call = random_call(FRAMES, keys, generator), random_call(2 * FRAMES, keys, generator)
    stored = SelfTokens.of(source_call)
    assert stored.key.shape[0] == len(torch.unique(stored.indices)), "keys kept once per key frame"
    mask = (torch.rand(FRAMES, 1, TOKENS, 1, generator=generator) > 0.5).float()
    window = torch.ones(1, dtype=torch.bool)
    plan = FusionPlan(1, window, window, blend_tokens=[1] if blend else None)
    fusion = FusionController(plan, source=lambda k: {"l": stored}, layers={"l": (False, TOKENS)})
    fusion.begin_step(0)
    fusion.masks[TOKENS] = mask
    replayed = fusion.attend(edit_call, layer="l")

    # The maps path: the source map recorded during inversion, fused with the edit's, times the edit's values.
    source_map = probs(source_call.query, source_call.gathered(source_call.key), source_call.scale)
    edit_maps = probs(edit_call.query, edit_call.gathered(edit_call.key), edit_call.scale)
    values = edit_call.gathered(edit_call.value)
    fused_map = mask * edit_maps[FRAMES:] + (1 - mask) * source_map if blend else source_map
    expected = torch.cat([edit_maps[:FRAMES], fused_map]) @ values
    torch.testing.assert_close(replayed, expected, rtol=0, atol=1e-5)


class MapsRecorder:
    """The reference recorder: every layer's probabilities, self-attention included."""

    def __init__(self, steps: set[int]) -> None:
        self.inner = RecordingController(10**6, steps, self.sink)
        self.maps: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def step(self) -> int:
        return self.inner.step

    @step.setter
    def step(self, value: int) -> None:
        self.inner.step = value

    def sink(self, step: int, layer: str, is_cross: bool, recorded: torch.Tensor) -> None:
        self.maps.setdefault(step, {})[layer] = recorded.clone()

    def wants(self, layer: str, is_cross: bool, query_len: int) -> bool:
        return self.inner.wants(layer, is_cross, query_len)

    def __call__(self, probs: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.inner(probs, **kwargs)


class MapsFusion:
    """The reference fusion: self-attention fused as maps, ``M P_edit + (1 - M) P_src``."""

    def __init__(self, inner: FusionController) -> None:
        self.inner = inner

    def begin_step(self, step: int) -> None:
        self.inner.begin_step(step)

    def wants(self, layer: str, is_cross: bool, query_len: int) -> bool:
        return self.inner.wants(layer, is_cross, query_len)

    def __call__(self, probs: torch.Tensor, *, layer: str, is_cross: bool, num_frames: int) -> torch.Tensor:
        if is_cross:
            return self.inner(probs, layer=layer, is_cross=True, num_frames=num_frames)
        source = self.inner._maps[layer].to(probs)
        if self.inner.plan.blend_tokens is not None:
            mask = self.inner.mask(probs.shape[2]).to(probs)
            source = mask * probs[-num_frames:] + (1 - mask) * source
        return torch.cat([probs[:-num_frames], source])


@pytest.fixture(scope="module")
def parts(tiny_bundle: Path) -> dict:
    return {name: load_component(str(tiny_bundle), name) for name in ("unet", "tokenizer", "text_encoder", "scheduler")}


def mixed_mask(query_len: int) -> torch.Tensor:
    """A fixed random blend mask ``(3, 1, query_len, 1)`` with both values."""
    mask = (torch.rand(3, 1, query_len, 1, generator=torch.Generator().manual_seed(query_len)) > 0.5).double()
    assert 0 < mask.mean() < 1
    return mask


def query_lengths(recorded: dict) -> dict[str, tuple[bool, int]]:
    return {name: (isinstance(r, torch.Tensor), (r if isinstance(r, torch.Tensor) else r.query).shape[2])
            for name, r in recorded.items()}  # fmt: skip


@pytest.mark.parametrize("blend", [False, True])
def test_the_tiny_fatezero_edit_from_tokens_matches_the_maps_path(parts: dict, blend: bool) -> None:
    """In float64, so the two paths differ by their algebra only (in float32 their roundings differ by
    ~2e-5 after four guided steps)."""
    unet = copy.deepcopy(parts["unet"]).double()
    tokenizer, text_encoder, scheduler = parts["tokenizer"], parts["text_encoder"], parts["scheduler"]
    steps, source_prompt, target_prompt = 4, "a cat walking on a street", "a dog walking on a street"
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    source = encode_prompts(tokenizer, text_encoder, [source_prompt]).double()
    edit = encode_prompts(tokenizer, text_encoder, ["", target_prompt]).double()
    recorded: dict[int, dict] = {}
    tokens = RecordingController(10**6, set(range(steps)), lambda k, layer, c, r: recorded.setdefault(k, {}).__setitem__(layer, r))
    maps = MapsRecorder(set(range(steps)))
    inverted = {}
    for name, recorder in (("tokens", tokens), ("maps", maps)):
        install_frame_processors(unet, frame_keys=("self", "mid"), min_channels=0, controller=recorder)
        try:
            inverted[name] = fatezero_invert(unet, z0, source, scheduler, steps, recorder)
        finally:
            restore_default_processors(unet)
    torch.testing.assert_close(inverted["tokens"], inverted["maps"], rtol=0, atol=1e-5)

    kwargs = {"blend_words": (["cat"], ["dog"])} if blend else {}
    plan, _ = fusion_plan(tokenizer, source_prompt, target_prompt, steps, latent_shape=(8, 8), cross_replace_steps=0.8,
                          self_replace_steps=0.8, replace=True, **kwargs)  # fmt: skip
    layers = query_lengths(recorded[0])
    edited = {}
    tokens_fusion = FusionController(plan, recorded.__getitem__, layers)
    maps_fusion = FusionController(plan, maps.maps.__getitem__, layers)
    if blend:  # a mask of both values at every resolution (the tiny model's random maps would give all ones)
        tokens_fusion._mask = maps_fusion._mask = mixed_mask
    for name, controller in (("tokens", tokens_fusion), ("maps", MapsFusion(maps_fusion))):
        install_frame_processors(unet, frame_keys=("self", "mid"), min_channels=0, controller=controller)
        try:
            edited[name] = fatezero_edit(unet, inverted["maps"], edit, scheduler, steps, controller, 7.5)
        finally:
            restore_default_processors(unet)
    torch.testing.assert_close(edited["tokens"], edited["maps"], rtol=0, atol=1e-5)


def test_no_self_attention_map_is_formed_while_inverting_or_editing(parts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The only way the processor forms probabilities is Attention.get_attention_scores: only cross layers call it."""
    unet, tokenizer, text_encoder, scheduler = parts["unet"], parts["tokenizer"], parts["text_encoder"], parts["scheduler"]
    key_lengths: list[int] = []
    real, real_softmax = Attention.get_attention_scores, torch.Tensor.softmax

    def spy(self, query, key, attention_mask=None):
        key_lengths.append(key.shape[1])
        return real(self, query, key, attention_mask)

    def softmax_spy(self, *args, **kwargs):
        key_lengths.append(self.shape[-1])
        return real_softmax(self, *args, **kwargs)

    monkeypatch.setattr(Attention, "get_attention_scores", spy)
    monkeypatch.setattr(torch.Tensor, "softmax", softmax_spy)
    steps, prompt = 2, "a cat walking on a street"
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    recorded: dict[int, dict] = {}
    recorder = RecordingController(10**6, {0, 1}, lambda k, layer, c, r: recorded.setdefault(k, {}).__setitem__(layer, r))
    install_frame_processors(unet, frame_keys=("mid",), min_channels=0, controller=recorder)
    try:
        z_t = fatezero_invert(unet, z0, encode_prompts(tokenizer, text_encoder, [prompt]), scheduler, steps, recorder)
    finally:
        restore_default_processors(unet)
    plan, _ = fusion_plan(tokenizer, prompt, "a dog walking on a street", steps, latent_shape=(8, 8), cross_replace_steps=1.0,
                          self_replace_steps=1.0, replace=True, blend_words=(["cat"], ["dog"]))  # fmt: skip
    fusion = FusionController(plan, recorded.__getitem__, query_lengths(recorded[0]))
    install_frame_processors(unet, frame_keys=("mid",), min_channels=0, controller=fusion)
    try:
        fatezero_edit(unet, z_t, encode_prompts(tokenizer, text_encoder, ["", "a dog walking on a street"]), scheduler,
                      steps, fusion, 7.5)  # fmt: skip
    finally:
        restore_default_processors(unet)
    assert key_lengths and set(key_lengths) == {77}, "probabilities (and softmaxes) were formed for cross-attention only"
    assert any(isinstance(r, SelfTokens) for r in recorded[0].values())


def test_recording_and_replaying_tokens_leave_diffusers_stock_attention_unchanged(parts: dict) -> None:
    """With per-frame attention, a pass that records tokens, and one that replays them into the same latents,
    equal diffusers' own UNet with its stock AttnProcessor2_0 (ours vs theirs on the same inputs)."""
    unet, tokenizer, text_encoder = parts["unet"], parts["tokenizer"], parts["text_encoder"]
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    text = encode_prompts(tokenizer, text_encoder, ["a cat walking on a street"]).expand(3, -1, -1)
    restore_default_processors(unet)
    with torch.no_grad():
        stock = unet(z, 500, encoder_hidden_states=text).sample
    recorded: dict[str, object] = {}

    def run(controller) -> torch.Tensor:
        install_frame_processors(unet, frame_keys=(), min_channels=0, controller=controller)
        try:
            set_num_frames(unet, 3)
            with torch.no_grad():
                return unet(z, 500, encoder_hidden_states=text).sample
        finally:
            restore_default_processors(unet)

    outputs = [run(RecordingController(10**6, {0}, lambda k, layer, c, r: recorded.__setitem__(layer, r)))]
    self_only = FusionPlan(1, torch.zeros(1, dtype=torch.bool), torch.ones(1, dtype=torch.bool))
    replay = FusionController(self_only, {0: recorded}.__getitem__, query_lengths(recorded))
    replay.begin_step(0)
    outputs.append(run(replay))
    assert any(isinstance(r, SelfTokens) for r in recorded.values())
    for output in outputs:
        torch.testing.assert_close(output, stock, rtol=0, atol=1e-5)
