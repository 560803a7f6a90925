"""Prompt-to-Prompt cross-attention operators and FateZero's blending mask, as pure tensor functions.

Contract: Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control", §3.2,
edit an image by fusing the source prompt's cross-attention maps into the target prompt's pass:
word swap (Replace: ``A_src @ M``), prompt refinement (Refine: columns of aligned tokens taken from
the source through a token alignment, new tokens keep the edit map), and attention re-weighting
(Reweight: scale the columns of chosen words), each active only for a window of the first steps.
FateZero (Qi et al. 2023, §3.2) applies the same operators to maps recorded during DDIM
inversion instead of a second reconstruction pass, and fuses self-attention through a mask
thresholded from the source words' cross-attention (its eq. for ``M_t``; methods.md 1.7 and 1.8).
This module builds those operators from prompts (token positions, alignment, replacement matrix,
equaliser, step window, blend mask) and applies them to given maps; it never touches a model, so
the attention processors and controller that feed it maps stay elsewhere. Token positions count
the BOS token as 0, as the text encoder's 77 output tokens do.
"""

# Notation (paper / FateZero code symbol -> variable):
#   M_t^*           -> source_map   source (inversion-time) cross-attention, (F, H, Nq, 77)
#   M_t             -> edit_map     the editing pass's own cross-attention, same shape
#   M (word swap)   -> replace      (77, 77), source token (row) -> target token (column)
#   M (alignment)   -> mapper       target token j -> aligned source token, -1 if none
#   alpha / beta    -> alphas       1 where target token j is aligned, else 0
#   c (reweight)    -> equalizer    (77,) column scales
#   tau             -> threshold    blend_th in FateZero's configs
#   M_t (blend)     -> blend_mask's output, 1 = keep the edit's self-attention

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

MAX_LENGTH = 77

# Needleman-Wunsch scores of P2P's seq_aligner: a mismatch is never better than two gaps, so only
# identical tokens are aligned and the alignment is a longest common subsequence.
_MATCH, _MISMATCH, _GAP = 1, -1, 0
# Traceback moves, tried in this order on ties (P2P's order, so mappers agree with FateZero's).
_LEFT, _UP, _DIAG = 1, 2, 3


def word_token_indices(tokenizer: PreTrainedTokenizerBase, prompt: str, word: str) -> list[int]:
    """Token positions (BOS = 0) of every occurrence of ``word`` among the prompt's space-separated words.

    A word that the tokenizer splits into several tokens gives all of them. Words match exactly as
    written, like FateZero's ``ptp_utils.get_word_inds``, which compares ``prompt.split(" ")``
    entries with ``==``; CLIP lowercases, so ``"Porsche"`` and ``"porsche"`` have the same tokens
    but only the spelling used in the prompt matches.

    Raises:
        ValueError: ``word`` is empty or contains a space, or is not a word of ``prompt``.
    """
    if not word or " " in word:
        raise ValueError(f"word must be one space-free word; got {word!r}")
    spans = _word_spans(tokenizer, prompt)
    indices = [i for w, span in spans if w == word for i in span]
    if not indices:
        raise ValueError(f"word {word!r} is not in the prompt {prompt!r}")
    return indices


def refine_mapper(
    tokenizer: PreTrainedTokenizerBase, source: str, target: str, max_len: int = MAX_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align the target prompt's tokens to the source's for Refine (P2P §3.2, "Adding a New Phrase").

    Global (Needleman-Wunsch) alignment of the two token sequences, BOS and EOS included, scored
    as P2P's seq_aligner (match +1, mismatch -1, gap 0; ties prefer a target gap, then a source
    gap, then the diagonal). Positions past the target's EOS are padding and map to themselves.

    Returns:
        ``(mapper, alphas)``: ``mapper`` ``(max_len,)`` int64, the source position aligned to target
        token ``j`` or ``-1``; ``alphas`` ``(max_len,)`` float32, 1 where aligned or padding, 0 for
        target tokens with no source counterpart (new words).

    Raises:
        ValueError: A prompt needs more than ``max_len`` tokens.
    """
    source_ids = _token_ids(tokenizer, source, max_len)
    target_ids = _token_ids(tokenizer, target, max_len)
    aligned = _align(source_ids, target_ids)
    mapper = torch.arange(max_len, dtype=torch.int64)
    mapper[: len(aligned)] = torch.tensor(aligned, dtype=torch.int64)
    alphas = (mapper >= 0).to(torch.float32)
    return mapper, alphas


def replace_matrix(
    tokenizer: PreTrainedTokenizerBase, source: str, target: str, max_len: int = MAX_LENGTH
) -> torch.Tensor:
    """The word-swap matrix ``M`` of P2P §3.2 for two prompts with the same number of words.

    ``(source_map @ M)[..., j] = sum_i source_map[..., i] * M[i, j]``. Words are compared position
    by position; equal words (and BOS, EOS) map token to token with weight 1. A differing word maps
    token to token when both spellings have the same token count, else every source token to every
    target token with weight ``1 / len(target tokens)`` (P2P's rule). Padding continues the
    token-to-token walk; when the source prompt has more tokens than the target, the last target
    columns have no source partner left and read the last source column (padding).
    Adaptation: P2P's seq_aligner maps the tail after the last swapped word ``j -> j``, which
    misaligns it when the swapped words' token counts differ; here the tail keeps the offset.

    Returns:
        ``(max_len, max_len)`` float32, rows source tokens, columns target tokens.

    Raises:
        ValueError: The word counts differ (naming both), or a prompt needs more than ``max_len``
            tokens.
    """
    source_spans = _word_spans(tokenizer, source)
    target_spans = _word_spans(tokenizer, target)
    if len(source_spans) != len(target_spans):
        raise ValueError(
            "a replace edit needs prompts with the same number of words, but the source has "
            f"{len(source_spans)} words ({source!r}) and the target {len(target_spans)} ({target!r})"
        )
    n_source = len(_token_ids(tokenizer, source, max_len))
    n_target = len(_token_ids(tokenizer, target, max_len))
    matrix = torch.zeros(max_len, max_len, dtype=torch.float32)
    matrix[0, 0] = 1.0  # BOS
    for (source_word, rows), (target_word, cols) in zip(source_spans, target_spans):
        if source_word == target_word or len(rows) == len(cols):
            matrix[rows, cols] = 1.0
        elif cols:
            matrix[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = 1.0 / len(cols)
    # EOS and padding: keep walking token to token from each prompt's EOS.
    for offset in range(max_len - n_target + 1):
        col = n_target - 1 + offset
        matrix[min(n_source - 1 + offset, max_len - 1), col] = 1.0
    return matrix


def equalizer(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    words: Sequence[str],
    values: Sequence[float],
    max_len: int = MAX_LENGTH,
) -> torch.Tensor:
    """Column scales for P2P's Reweight (§3.2, "Attention Re-weighting"): ones, ``values[k]`` on ``words[k]``.

    Returns:
        ``(max_len,)`` float32.

    Raises:
        ValueError: ``words`` and ``values`` differ in length, or a word is not in ``prompt`` (a
            typo would otherwise be a silent no-op), or its tokens lie beyond ``max_len``.
    """
    if len(words) != len(values):
        raise ValueError(f"equalizer needs one value per word; got {len(words)} words and {len(values)} values")
    scales = torch.ones(max_len, dtype=torch.float32)
    for word, value in zip(words, values):
        indices = word_token_indices(tokenizer, prompt, word)
        if max(indices) >= max_len:
            raise ValueError(f"word {word!r} lies beyond the first {max_len} tokens of {prompt!r}")
        scales[indices] = float(value)
    return scales


def step_window(num_steps: int, fraction: float | tuple[float, float]) -> torch.Tensor:
    """Which edit steps an operator is active in: ``(num_steps,)`` bool.

    ``fraction = f`` means ``(0, f)``. Step ``i`` is active when
    ``floor(start * T) <= i < floor(end * T)``, which is FateZero's ``int(x * T)`` on both bounds
    (its ``num_self_replace``; ``int`` floors non-negative numbers). Two deliberate differences:
    the products are floored with a 1e-9 tolerance, so ``0.58 * 50 = 28.999999999999996`` gives 29
    steps where Python's ``int`` gives 28; and FateZero's cross-attention window uses
    ``int(x * (T + 1))`` (its alpha table has ``T + 1`` rows), which gives one step more only when
    ``x * T`` has a fractional part of at least ``1 - x`` (never for 50 steps and fractions on a
    0.02 grid; e.g. 0.95 of 10 steps: 9 here, 10 there).

    Raises:
        ValueError: ``num_steps < 1`` or the bounds are not ``0 <= start <= end <= 1``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive; got {num_steps}")
    start, end = (0.0, float(fraction)) if isinstance(fraction, (int, float)) else map(float, fraction)
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"step window bounds must satisfy 0 <= start <= end <= 1; got ({start}, {end})")
    first, stop = (math.floor(bound * num_steps + 1e-9) for bound in (start, end))
    steps = torch.arange(num_steps)
    return (steps >= first) & (steps < stop)


def apply_cross_fusion(
    source_map: torch.Tensor,
    edit_map: torch.Tensor,
    *,
    mapper: torch.Tensor | None = None,
    alphas: torch.Tensor | None = None,
    replace: torch.Tensor | None = None,
    equalizer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fuse source and edit cross-attention with Refine or Replace, then Reweight.

    Refine (``mapper`` and ``alphas``): ``fused[..., j] = alphas[j] * source_map[..., mapper[j]] +
    (1 - alphas[j]) * edit_map[..., j]``. Replace (``replace``): ``fused = source_map @ replace``.
    Then ``fused *= equalizer`` column-wise, without renormalisation (as P2P and FateZero). The
    step window is the caller's: outside it the caller uses ``edit_map`` unchanged.

    Args:
        source_map: ``(F, H, Nq, K)`` (any leading dims), e.g. inversion-time maps; cast to
            ``edit_map``'s dtype and device.
        edit_map: Same shape as ``source_map``.
        mapper, alphas: ``(K,)`` from :func:`refine_mapper`.
        replace: ``(K, K)`` from :func:`replace_matrix`.
        equalizer: ``(K,)`` from :func:`equalizer`.

    Returns:
        ``(F, H, Nq, K)`` in ``edit_map``'s dtype.

    Raises:
        ValueError: Not exactly one of Refine and Replace is given, or the shapes disagree.
    """
    # 1. validate
    if source_map.shape != edit_map.shape:
        raise ValueError(f"source map {tuple(source_map.shape)} and edit map {tuple(edit_map.shape)} differ in shape")
    if (mapper is None) != (alphas is None):
        raise ValueError("refine needs both mapper and alphas")
    if (mapper is None) == (replace is None):
        raise ValueError("give exactly one of refine (mapper and alphas) or replace")
    source_map = source_map.to(device=edit_map.device, dtype=edit_map.dtype)
    num_tokens = edit_map.shape[-1]
    # 2. refine or replace
    if mapper is not None:
        _check_vector(mapper, num_tokens, "mapper")
        _check_vector(alphas, num_tokens, "alphas")
        mapper = mapper.to(edit_map.device)
        alphas = alphas.to(device=edit_map.device, dtype=edit_map.dtype)
        if bool(((mapper < 0) & (alphas != 0)).any()):
            raise ValueError("mapper has -1 (unaligned) where alphas is not 0")
        fused = alphas * source_map[..., mapper.clamp(min=0)] + (1 - alphas) * edit_map
    else:
        if replace.shape != (num_tokens, num_tokens):
            raise ValueError(f"replace matrix must be ({num_tokens}, {num_tokens}); got {tuple(replace.shape)}")
        fused = source_map @ replace.to(device=edit_map.device, dtype=edit_map.dtype)
    # 3. reweight
    if equalizer is not None:
        _check_vector(equalizer, num_tokens, "equalizer")
        fused = fused * equalizer.to(device=edit_map.device, dtype=edit_map.dtype)
    return fused


def blend_mask(
    cross_maps: Sequence[torch.Tensor],
    token_indices: Sequence[int],
    *,
    threshold: float,
    out_res: int | tuple[int, int],
    in_shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """FateZero's self-attention blending mask from source cross-attention (methods.md 1.8).

    Mean over layers and heads of the summed maps of the word tokens, a 3x3 max-pool (stride 1,
    pad 1), a nearest resize to ``out_res``, division by each frame's maximum, then ``> threshold``.
    Normalised values are at most 1, so ``threshold >= 1`` gives all zeros (pure source
    self-attention); a threshold below every positive value gives 1 wherever the pooled map is
    positive. A frame whose maps are all zero gets a zero mask (for ``threshold >= 0``).

    Args:
        cross_maps: One tensor per layer, each ``(F, H_l, r*r, K)``, all at the same ``r`` (FateZero
            uses the five 16x16 layers); head counts may differ (heads are pooled, as FateZero
            concatenates them).
        token_indices: Token positions of the blend words (duplicates count once).
        threshold: ``tau``; FateZero's ``blend_th[0]``.
        out_res: Side, or ``(height, width)``, of the self-attention layer the mask is for.
        in_shape: ``(height, width)`` of the cross maps' query grid; None means square.

    Returns:
        ``(F, 1, out_h * out_w, 1)`` float32 in {0, 1}, on the maps' device; 1 keeps the edit
        pass's self-attention, 0 takes the source's.
    """
    # 1. validate
    if not cross_maps:
        raise ValueError("blend_mask needs at least one cross-attention map")
    frames, _, num_queries, num_tokens = cross_maps[0].shape
    res = math.isqrt(num_queries)
    in_h, in_w = in_shape or (res, res)
    out_h, out_w = (out_res, out_res) if isinstance(out_res, int) else out_res
    expected = (frames, num_queries, num_tokens)
    for layer in cross_maps:
        if layer.ndim != 4 or (layer.shape[0], layer.shape[2], layer.shape[3]) != expected:
            raise ValueError(f"cross maps must share (F, r*r, K) = {expected}; got {tuple(layer.shape)}")
    if in_h * in_w != num_queries:
        raise ValueError(f"cross maps have {num_queries} queries, not a {in_h}x{in_w} grid; pass in_shape")
    tokens = sorted(set(int(i) for i in token_indices))
    if not tokens or tokens[0] < 0 or tokens[-1] >= num_tokens:
        raise ValueError(f"token_indices must be non-empty and within [0, {num_tokens}); got {list(token_indices)}")
    if min(out_h, out_w) < 1:
        raise ValueError(f"out_res must be positive; got {out_res}")
    # 2. word map: sum over the word's tokens, mean over (layer, head) pairs -> (F, 1, r, r)
    heads = torch.cat([layer.float() for layer in cross_maps], dim=1)
    word_map = heads[..., tokens].sum(-1).mean(1).reshape(frames, 1, in_h, in_w)
    # 3. dilate, resize, normalise per frame, threshold
    word_map = F.max_pool2d(word_map, kernel_size=3, stride=1, padding=1)
    word_map = F.interpolate(word_map, size=(out_h, out_w), mode="nearest")
    peak = word_map.amax(dim=(-2, -1), keepdim=True)
    normalised = word_map / peak.clamp_min(torch.finfo(word_map.dtype).tiny)
    mask = (normalised > threshold).float()
    return mask.reshape(frames, 1, out_h * out_w, 1)


def _token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, max_len: int) -> list[int]:
    ids = list(tokenizer(prompt).input_ids)
    if len(ids) > max_len:
        raise ValueError(f"prompt {prompt!r} needs {len(ids)} tokens, more than max_len={max_len}")
    return ids


def _word_spans(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[tuple[str, list[int]]]:
    """``(word, token positions)`` for each of ``prompt.split(" ")``, BOS at position 0.

    CLIP's pre-tokenizer never merges across whitespace, so tokenizing word by word gives the
    prompt's tokens; this is checked, rather than matching decoded lengths as FateZero does.
    """
    spans: list[tuple[str, list[int]]] = []
    pieces: list[int] = []
    position = 1
    for word in prompt.split(" "):
        ids = list(tokenizer(word, add_special_tokens=False).input_ids)
        spans.append((word, list(range(position, position + len(ids)))))
        pieces.extend(ids)
        position += len(ids)
    whole = list(tokenizer(prompt, add_special_tokens=False).input_ids)
    if pieces != whole:
        raise ValueError(f"the tokenizer does not split {prompt!r} at spaces; word positions are ambiguous")
    return spans


def _align(source: list[int], target: list[int]) -> list[int]:
    """For each target position, the globally aligned source position, or -1 (Needleman-Wunsch)."""
    rows, cols = len(source) + 1, len(target) + 1
    score = [[0] * cols for _ in range(rows)]
    move = [[0] * cols for _ in range(rows)]
    for i in range(1, rows):
        score[i][0], move[i][0] = i * _GAP, _UP
    for j in range(1, cols):
        score[0][j], move[0][j] = j * _GAP, _LEFT
    for i in range(1, rows):
        for j in range(1, cols):
            pair = _MATCH if source[i - 1] == target[j - 1] else _MISMATCH
            options = (
                (score[i][j - 1] + _GAP, _LEFT),
                (score[i - 1][j] + _GAP, _UP),
                (score[i - 1][j - 1] + pair, _DIAG),
            )
            best = max(value for value, _ in options)
            score[i][j] = best
            move[i][j] = next(step for value, step in options if value == best)
    aligned = [-1] * len(target)
    i, j = len(source), len(target)
    while i > 0 or j > 0:
        step = move[i][j]
        if step == _DIAG:
            i, j = i - 1, j - 1
            aligned[j] = i
        elif step == _LEFT:
            j -= 1
        else:
            i -= 1
    return aligned


def _check_vector(vector: torch.Tensor, length: int, name: str) -> None:
    if vector.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},); got {tuple(vector.shape)}")
