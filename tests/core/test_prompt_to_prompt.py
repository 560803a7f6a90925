"""Prompt-to-Prompt operators and FateZero's blend mask on the tiny CLIP tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTokenizer

from reelflow.core.editing.prompt_to_prompt import (
    apply_cross_fusion,
    blend_mask,
    equalizer,
    refine_mapper,
    replace_matrix,
    step_window,
    word_token_indices,
)
from reelflow.core.tiny import tiny_tokenizer

K = 77


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return tiny_tokenizer()


# --- word -> token positions -------------------------------------------------------------------


def test_single_token_word_every_occurrence(tokenizer: CLIPTokenizer) -> None:
    prompt = "a silver jeep on a road"
    assert word_token_indices(tokenizer, prompt, "jeep") == [3]
    assert word_token_indices(tokenizer, prompt, "a") == [1, 5]


def test_multi_token_word_gives_all_its_tokens(tokenizer: CLIPTokenizer) -> None:
    prompt = "a crystal swan on a lake"
    ids = tokenizer(prompt).input_ids

    indices = word_token_indices(tokenizer, prompt, "crystal")

    assert indices == [2, 3, 4, 5, 6]
    assert "".join(tokenizer.decode([ids[i]]) for i in indices) == "crystal"
    assert word_token_indices(tokenizer, prompt, "swan") == [7]


def test_absent_word_names_word_and_prompt(tokenizer: CLIPTokenizer) -> None:
    with pytest.raises(ValueError, match=r"'tiger'.*'a bear in the forest'"):
        word_token_indices(tokenizer, "a bear in the forest", "tiger")


# --- refine ------------------------------------------------------------------------------------


def test_refine_maps_shared_words_to_source_positions(tokenizer: CLIPTokenizer) -> None:
    # source: BOS a cat riding a bike EOS; target: BOS a black cat riding a bike EOS
    mapper, alphas = refine_mapper(tokenizer, "a cat riding a bike", "a black cat riding a bike")

    assert mapper.shape == (K,) and mapper.dtype == torch.int64
    assert alphas.shape == (K,) and alphas.dtype == torch.float32
    aligned = [0, 1, 3, 4, 5, 6, 7]  # target positions of BOS, a, cat, riding, a, bike, EOS
    assert mapper[aligned].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert alphas[aligned].tolist() == [1.0] * 7
    assert alphas[2] == 0.0  # "black" is new
    assert mapper[8:].tolist() == list(range(8, K)) and bool((alphas[8:] == 1).all())


def test_refine_appended_style_words_are_new(tokenizer: CLIPTokenizer) -> None:
    mapper, alphas = refine_mapper(tokenizer, "a jeep on a road", "a jeep on a road in watercolor style")

    assert mapper[:6].tolist() == list(range(6)) and alphas[:6].tolist() == [1.0] * 6
    assert alphas[6:9].tolist() == [0.0, 0.0, 0.0]
    assert mapper[9] == 6 and alphas[9] == 1.0  # target EOS <- source EOS


def test_refine_breaks_ties_as_p2p_seq_aligner(tokenizer: CLIPTokenizer) -> None:
    # Aligning "red" or "car" is equally good; P2P's tie order keeps "car" (checked against seq_aligner).
    mapper, alphas = refine_mapper(tokenizer, "a red car", "a car red")

    assert mapper[:3].tolist() == [0, 1, 3]
    assert alphas[:5].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]


# --- replace -----------------------------------------------------------------------------------


def test_replace_matrix_of_identical_prompts_is_identity(tokenizer: CLIPTokenizer) -> None:
    prompt = "a crystal swan on a lake"
    assert torch.equal(replace_matrix(tokenizer, prompt, prompt), torch.eye(K))


def test_replace_matrix_spreads_a_word_over_a_longer_word(tokenizer: CLIPTokenizer) -> None:
    # source: BOS a cat on grass EOS; target: BOS a c r y st al(crystal) on grass EOS
    matrix = replace_matrix(tokenizer, "a cat on grass", "a crystal on grass")

    expected = torch.zeros(K, K)
    expected[0, 0] = expected[1, 1] = 1.0
    expected[2, 2:7] = 0.2  # cat -> each of crystal's 5 tokens, weight 1/5
    for offset in range(K - 7):  # on, grass, EOS and padding keep the 4-token offset
        expected[min(3 + offset, K - 1), 7 + offset] = 1.0
    assert torch.equal(matrix, expected)
    torch.testing.assert_close(matrix[:6].sum(1), torch.ones(6))  # each prompt token's mass is kept
    assert matrix[3, 7] == 1.0  # "on" is aligned (P2P's tail would give matrix[7, 7])


def test_replace_matrix_same_token_counts_swaps_in_place(tokenizer: CLIPTokenizer) -> None:
    source_map = torch.rand(1, 1, 4, K)
    matrix = replace_matrix(tokenizer, "a cat on grass", "a dog on grass")

    assert torch.equal(matrix, torch.eye(K))
    torch.testing.assert_close(apply_cross_fusion(source_map, torch.zeros_like(source_map), replace=matrix), source_map)


def test_replace_needs_equal_word_counts(tokenizer: CLIPTokenizer) -> None:
    with pytest.raises(ValueError, match=r"4 words.*5"):
        replace_matrix(tokenizer, "a cat on grass", "a black dog on grass")


# --- equalizer ---------------------------------------------------------------------------------


def test_equalizer_scales_exactly_the_word_columns(tokenizer: CLIPTokenizer) -> None:
    scales = equalizer(tokenizer, "a crystal swan in watercolor style", ["crystal", "watercolor"], [5.0, 10.0])

    expected = torch.ones(K)
    expected[2:7] = 5.0
    expected[9] = 10.0
    assert torch.equal(scales, expected)


def test_equalizer_refuses_mismatched_lengths_and_absent_words(tokenizer: CLIPTokenizer) -> None:
    with pytest.raises(ValueError, match="one value per word"):
        equalizer(tokenizer, "a cat", ["cat"], [2.0, 3.0])
    with pytest.raises(ValueError, match="'dog'"):
        equalizer(tokenizer, "a cat", ["dog"], [2.0])


# --- step window -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_steps", "fraction", "active"),
    [
        (50, 0.7, range(0, 35)),
        (50, 0.58, range(0, 29)),  # 0.58 * 50 = 28.999999999999996 in floats
        (10, 0.95, range(0, 9)),  # floor(9.5)
        (7, 0.5, range(0, 3)),  # floor(3.5)
        (10, (0.2, 0.7), range(2, 7)),
        (10, (0.25, 0.75), range(2, 7)),  # floor on both bounds, as FateZero's int()
        (10, 1.0, range(0, 10)),
        (10, 0.0, range(0, 0)),
    ],
)
def test_step_window_rounding(num_steps: int, fraction: float | tuple[float, float], active: range) -> None:
    window = step_window(num_steps, fraction)

    assert window.dtype == torch.bool and window.shape == (num_steps,)
    assert torch.nonzero(window).flatten().tolist() == list(active)


@pytest.mark.parametrize("fraction", [1.2, -0.1, (0.6, 0.3)])
def test_step_window_refuses_bad_bounds(fraction: float | tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="bounds"):
        step_window(10, fraction)


# --- cross fusion ------------------------------------------------------------------------------


@pytest.fixture
def maps() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    source = torch.rand(2, 3, 16, K, generator=generator).softmax(-1)
    edit = torch.rand(2, 3, 16, K, generator=generator).softmax(-1)
    return source, edit


def test_refine_with_identity_mapper_returns_source(maps: tuple[torch.Tensor, torch.Tensor]) -> None:
    source, edit = maps
    fused = apply_cross_fusion(source, edit, mapper=torch.arange(K), alphas=torch.ones(K))
    torch.testing.assert_close(fused, source, atol=0, rtol=0)


def test_refine_with_zero_alphas_returns_edit(maps: tuple[torch.Tensor, torch.Tensor]) -> None:
    source, edit = maps
    fused = apply_cross_fusion(source, edit, mapper=torch.arange(K).flip(0), alphas=torch.zeros(K))
    torch.testing.assert_close(fused, edit, atol=0, rtol=0)


def test_refine_takes_aligned_columns_from_source_and_new_ones_from_edit(
    tokenizer: CLIPTokenizer, maps: tuple[torch.Tensor, torch.Tensor]
) -> None:
    source, edit = maps
    mapper, alphas = refine_mapper(tokenizer, "a cat riding a bike", "a black cat riding a bike")

    fused = apply_cross_fusion(source, edit.half(), mapper=mapper, alphas=alphas)

    assert fused.dtype == torch.float16
    torch.testing.assert_close(fused[..., 2], edit[..., 2].half())  # "black"
    torch.testing.assert_close(fused[..., 3], source[..., 2].half())  # "cat" from the source's "cat"
    torch.testing.assert_close(fused[..., 7], source[..., 6].half())  # EOS


def test_equalizer_multiplies_fused_columns(maps: tuple[torch.Tensor, torch.Tensor]) -> None:
    source, edit = maps
    scales = torch.ones(K)
    scales[4] = 10.0

    fused = apply_cross_fusion(source, edit, replace=torch.eye(K), equalizer=scales)

    torch.testing.assert_close(fused[..., 4], 10 * source[..., 4])
    torch.testing.assert_close(fused[..., :4], source[..., :4])


def test_fusion_needs_exactly_one_operator(maps: tuple[torch.Tensor, torch.Tensor]) -> None:
    source, edit = maps
    with pytest.raises(ValueError, match="exactly one"):
        apply_cross_fusion(source, edit)
    with pytest.raises(ValueError, match="exactly one"):
        apply_cross_fusion(source, edit, mapper=torch.arange(K), alphas=torch.ones(K), replace=torch.eye(K))
    with pytest.raises(ValueError, match="both"):
        apply_cross_fusion(source, edit, mapper=torch.arange(K))


# --- blend mask --------------------------------------------------------------------------------

R = 4
WORD = [2, 3]


def _word_maps(*peaks: tuple[int, int, int, float], frames: int = 2, heads: int = 2) -> torch.Tensor:
    """``(frames, heads, R*R, K)`` zeros but ``value`` at ``(row, col)`` of ``token`` in every frame and head."""
    maps = torch.zeros(frames, heads, R, R, K)
    for token, row, col, value in peaks:
        maps[:, :, row, col, token] = value
    return maps.reshape(frames, heads, R * R, K)


def _grid(mask: torch.Tensor, res: int) -> torch.Tensor:
    return mask[0, 0, :, 0].reshape(res, res)


@pytest.mark.parametrize("threshold", [1.0, 2.0])
def test_blend_threshold_at_or_above_one_gives_zero_mask(
    maps: tuple[torch.Tensor, torch.Tensor], threshold: float
) -> None:
    source, _ = maps
    mask = blend_mask([source, source], WORD, threshold=threshold, out_res=8)

    assert mask.shape == (2, 1, 64, 1) and mask.dtype == torch.float32
    assert not mask.any()


def test_blend_tiny_threshold_is_one_wherever_the_pooled_map_is_positive(
    maps: tuple[torch.Tensor, torch.Tensor],
) -> None:
    source, _ = maps
    assert bool((blend_mask([source], WORD, threshold=1e-12, out_res=R) == 1).all())

    corner = _word_maps((2, 0, 0, 0.5))
    grid = _grid(blend_mask([corner], WORD, threshold=1e-12, out_res=R), R)
    expected = torch.zeros(R, R)
    expected[:2, :2] = 1.0
    assert torch.equal(grid, expected)


def test_blend_peak_is_dilated_by_one_pixel_then_resized() -> None:
    # A weaker bump at (3, 3) and a big map on a token outside the word must not show.
    layer = _word_maps((2, 1, 1, 0.9), (3, 3, 3, 0.2), (40, 3, 0, 5.0))

    same = _grid(blend_mask([layer], WORD, threshold=0.5, out_res=R), R)
    double = blend_mask([layer], WORD, threshold=0.5, out_res=2 * R)

    expected = torch.zeros(R, R)
    expected[0:3, 0:3] = 1.0  # the 3x3 neighbourhood of (1, 1)
    assert torch.equal(same, expected)
    assert double.shape == (2, 1, 4 * R * R, 1)
    assert torch.equal(_grid(double, 2 * R), expected.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert torch.equal(double[0], double[1])


def test_blend_averages_layers_and_normalises_each_frame() -> None:
    strong = _word_maps((2, 0, 0, 1.0))
    weak = _word_maps((3, 3, 3, 0.4))
    strong[1] *= 100  # frame 1 is louder; per-frame normalisation gives it the same mask
    weak[1] *= 100

    low = blend_mask([strong, weak], WORD, threshold=0.3, out_res=R)
    high = blend_mask([strong, weak], WORD, threshold=0.5, out_res=R)

    # layer mean: 0.5 near (0, 0), 0.2 near (3, 3); normalised 1.0 and 0.4
    assert _grid(low, R)[3, 3] == 1.0 and _grid(low, R)[0, 0] == 1.0
    assert _grid(high, R)[3, 3] == 0.0 and _grid(high, R)[0, 0] == 1.0
    assert torch.equal(low[0], low[1]) and torch.equal(high[0], high[1])
