"""FateZero's attention controllers (Qi et al. 2023, §3.1-3.2): record during inversion, fuse
during editing.

The recorder hands what an inversion step's attention needs to be replayed to a sink, so the caller
can stream it to storage instead of holding all steps in memory: the probability maps of
cross-attention layers (``Nq x 77``, small, needed per token), and for self-attention layers the
queries of every frame and the keys of the key frames (:class:`SelfTokens`), never the ``Nq x Nk``
maps (FateZero's reference stores those: ~680 MiB per step at SD 1.5 shapes, 741 MiB with the cross
maps, methods.md 1.4). The
fusion controller receives, at edit step i, what was recorded at inversion step T-1-i (the same
timestep, methods.md 1.6) and, on the conditional half of the classifier-free-guidance batch only:

- cross-attention, inside the cross window: Prompt-to-Prompt refine or replace of the stored
  source maps into the edit's, then reweighting of chosen target words (methods.md 1.7);
- self-attention, inside the self window: the source attention applied to the edit's values,
  ``P_src V_edit = sdpa(Q_src, K_src, V_edit)``, or with blend words, by linearity,
  ``M * sdpa(Q_edit, K_edit, V_edit) + (1 - M) * sdpa(Q_src, K_src, V_edit)``, which is
  ``(M P_edit + (1 - M) P_src) V_edit`` where M thresholds the source cross-attention of the blend
  words (methods.md 1.8).

The plan the fusion controller follows (windows, token maps, thresholds) is built from an edit's
prompts and options by :func:`fusion_plan`, and :func:`word_heatmaps` reads back the source maps the
first blend mask came from, for display.

Notation: ``T`` = steps, ``i`` = edit step (0 = noisiest), ``k = T-1-i`` = inversion step with the
same timestep, ``F`` = frames, ``H`` = heads, ``Nq``/``Nk`` = query/key tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from reelflow.core.attention.processor import SelfAttention

from reelflow.core.editing.prompt_to_prompt import (
    apply_cross_fusion,
    blend_mask,
    equalizer,
    refine_mapper,
    replace_matrix,
    step_window,
    word_token_indices,
)

@dataclass(frozen=True)
class SelfTokens:
    """What a self-attention layer needs to be replayed: every frame's queries, the key frames' keys.

    ``query`` is ``(F, H, Nq, d)``, ``key`` ``(U, H, Nq, d)`` for the ``U`` frames in ``key_frames``,
    and ``indices`` ``(F, K)`` lists the key frames of every frame (frame numbers), as the cross-frame
    processor gathered them.
    """

    query: torch.Tensor
    key: torch.Tensor
    key_frames: torch.Tensor
    indices: torch.Tensor

    @classmethod
    def of(cls, call: SelfAttention) -> SelfTokens:
        """The conditional clip's tokens of a self-attention call (the last ``F`` rows)."""
        frames = call.num_frames
        indices = torch.arange(frames)[:, None] if call.indices is None else call.indices.cpu()
        key_frames = torch.unique(indices)
        return cls(call.query[-frames:], call.key[-frames:][key_frames.to(call.key.device)], key_frames, indices)

    def gathered_key(self) -> torch.Tensor:
        """Every frame's key-frame keys, concatenated as the processor does: ``(F, H, K*Nq, d)``."""
        position = torch.searchsorted(self.key_frames, self.indices)  # frame number -> row of ``key``
        frames, keys = position.shape
        heads, length, dim = self.key.shape[1:]
        gathered = self.key[position.to(self.key.device)]  # (F, K, H, Nq, d)
        return gathered.permute(0, 2, 1, 3, 4).reshape(frames, heads, keys * length, dim)

    def to(self, device: torch.device, dtype: torch.dtype) -> SelfTokens:
        move = lambda t: t.to(device=device, non_blocking=True).to(dtype)  # noqa: E731
        return SelfTokens(move(self.query), move(self.key), self.key_frames, self.indices)


Recorded = torch.Tensor | SelfTokens
"""A cross-attention layer's maps ``(F, H, Nq, Nk)``, or a self-attention layer's tokens."""
MapSink = Callable[[int, str, bool, Recorded], None]
"""``sink(step, layer, is_cross, recorded)``."""
MapSource = Callable[[int], Mapping[str, Recorded]]
"""``source(inversion_step) -> {layer: recorded}`` of the recorded layers."""


@dataclass
class RecordingController:
    """Hands what layers with ``Nq <= max_query_len`` need for replay at the recorded steps to ``sink``:
    the maps of cross-attention, the queries and key-frame keys of self-attention.

    Cross- and self-attention have their own step sets: an edit fuses them over different windows.
    """

    max_query_len: int
    cross_steps: Collection[int]
    sink: MapSink
    self_steps: Collection[int] | None = None  # None: the same as cross_steps
    step: int = 0

    def wants(self, layer: str, is_cross: bool, query_len: int) -> bool:
        steps = self.cross_steps if is_cross or self.self_steps is None else self.self_steps
        return query_len <= self.max_query_len and self.step in steps

    def __call__(self, probs: torch.Tensor, *, layer: str, is_cross: bool, num_frames: int) -> torch.Tensor:
        self.sink(self.step, layer, is_cross, probs[-num_frames:])
        return probs

    def attend(self, call: SelfAttention, *, layer: str) -> torch.Tensor:
        self.sink(self.step, layer, False, SelfTokens.of(call))
        return call.attend()


def recorded_steps(num_steps: int, fraction: float) -> list[int]:
    """Inversion steps whose maps an edit with replace windows up to ``fraction`` can use.

    Edit step i reads inversion step T-1-i, and the windows cover edit steps i < int(fraction * T)
    (FateZero's bounds), so the last int(fraction * T) inversion steps are needed.
    """
    used = min(num_steps, int(math.ceil(fraction * num_steps)))
    return list(range(num_steps - used, num_steps))


@dataclass
class FusionPlan:
    """Everything about one edit that does not change from step to step."""

    num_steps: int
    cross_window: torch.Tensor  # bool (T,)
    self_window: torch.Tensor  # bool (T,)
    mapper: torch.Tensor | None = None  # refine: (77,) source index per target token
    alphas: torch.Tensor | None = None  # refine: (77,) 1 where aligned
    replace: torch.Tensor | None = None  # replace: (77, 77)
    equalizer: torch.Tensor | None = None  # (77,) reweighting of target-word columns
    blend_tokens: list[int] | None = None  # source-prompt token indices of the blend words
    blend_threshold: float = 0.3
    blend_resolution: int | None = None  # width of the maps the mask comes from
    latent_shape: tuple[int, int] | None = None  # (h, w) of the latents; None means square
    latent_window: torch.Tensor | None = None  # bool (T,): steps whose latents are blended (methods.md 1.9)
    target_tokens: list[int] | None = None  # target-prompt token indices of the target blend words

    def reads(self, step: int) -> bool:
        """Whether edit step ``step`` fuses or blends anything, so needs the maps of inversion step ``T-1-step``."""
        latent = self.latent_window is not None and bool(self.latent_window[step])
        return bool(self.cross_window[step] or self.self_window[step] or latent)

    def source_steps(self) -> list[int]:
        """The inversion steps whose maps the edit reads, in the order it reads them (for prefetching)."""
        return [self.num_steps - 1 - i for i in range(self.num_steps) if self.reads(i)]

    def grid(self, query_len: int) -> tuple[int, int]:
        """``(height, width)`` of a layer's query grid: the latent grid downscaled to ``query_len`` cells."""
        if self.latent_shape is None:
            side = math.isqrt(query_len)
            return side, side
        h, w = self.latent_shape
        scale = math.isqrt(h * w // query_len)
        if (h // scale) * (w // scale) != query_len:
            raise ValueError(f"{query_len} queries are not the {h}x{w} latent grid downscaled by a power of two")
        return h // scale, w // scale


@dataclass
class FusionController:
    """Fuses the stored inversion maps into the edit's attention, step by step."""

    plan: FusionPlan
    source: MapSource
    layers: Mapping[str, tuple[bool, int]]  # recorded layer -> (is_cross, query_len)
    step: int = -1
    masks: dict[int, torch.Tensor] = field(default_factory=dict)
    first_mask: torch.Tensor | None = None  # (F, r, r) at the blend resolution, for the UI
    first_maps: list[torch.Tensor] = field(default_factory=list)  # the source cross maps it came from
    target_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # edit cross maps summed over steps
    # For display: the source's (stored) and the edit's own cross maps at the blend resolution, mean over heads
    # ``(F, 1, q, 77)``, summed over the steps that fuse them; only maps the fusion forms anyway, so showing them
    # changes nothing computed.
    shown_maps: dict[str, dict[str, torch.Tensor]] = field(default_factory=lambda: {"source": {}, "target": {}})
    _maps: Mapping[str, Recorded] = field(default_factory=dict)

    def begin_step(self, step: int) -> None:
        """Load the maps of the inversion step with this edit step's timestep, if the step uses any."""
        self.step, self.masks = step, {}
        self._maps = self.source(self.plan.num_steps - 1 - step) if self.plan.reads(step) else {}

    def _capturing(self, layer: str, is_cross: bool) -> bool:
        """Latent blending needs the edit's own target-word maps, summed from the first step on."""
        window = self.plan.latent_window
        if window is None or not is_cross or not window.any():
            return False
        last = int(window.nonzero().max())
        return self.step <= last and layer in self._blend_layers()

    def _blend_layers(self) -> list[str]:
        cross = {name: q for name, (is_cross, q) in self.layers.items() if is_cross}
        if not cross:
            return []
        widths = {q: self.plan.grid(q)[1] for q in cross.values()}
        wanted = self.plan.blend_resolution or min(widths.values())
        query_len = min(widths, key=lambda q: (abs(widths[q] - wanted), -widths[q]))
        return [name for name, q in cross.items() if q == query_len]

    @property
    def has_maps(self) -> bool:
        """Whether the current step loaded stored maps (it fuses something)."""
        return bool(self._maps)

    def mask(self, query_len: int) -> torch.Tensor:
        """The blend mask of the current step for a layer with ``query_len`` queries, ``(F, 1, query_len, 1)``."""
        return self._mask(query_len)

    def latent_mask(self, query_len: int) -> torch.Tensor:
        """Latent-blending mask ``(F, 1, query_len, 1)``: the source words' mask united with the target
        words' mask from the edit's cross-attention summed over the steps so far (methods.md 1.9)."""
        mask = self._mask(query_len)
        if self.plan.target_tokens and self.target_maps:
            maps = list(self.target_maps.values())
            grid = self.plan.grid(maps[0].shape[2])
            target = blend_mask(maps, self.plan.target_tokens, threshold=self.plan.blend_threshold,
                                out_res=self.plan.grid(query_len), in_shape=grid)  # fmt: skip
            mask = torch.maximum(mask, target.to(mask))
        return mask

    def wants(self, layer: str, is_cross: bool, query_len: int) -> bool:
        return self._fusing(layer, is_cross) or self._capturing(layer, is_cross)

    def _fusing(self, layer: str, is_cross: bool) -> bool:
        window = self.plan.cross_window if is_cross else self.plan.self_window
        return layer in self._maps and bool(window[self.step])

    def __call__(self, probs: torch.Tensor, *, layer: str, is_cross: bool, num_frames: int) -> torch.Tensor:
        edit = probs[-num_frames:]
        if self._capturing(layer, is_cross):
            summed = self.target_maps.get(layer)
            self.target_maps[layer] = edit.detach().float() + (summed if summed is not None else 0)
        if not self._fusing(layer, is_cross):
            return probs
        if not is_cross:
            raise TypeError(f"{layer}: self-attention is fused from its stored tokens, through attend(), not from maps")
        source = self._maps[layer].to(device=probs.device, non_blocking=True).to(probs.dtype)
        if layer in self._blend_layers():
            for side, maps in (("source", source), ("target", edit)):
                summed = self.shown_maps[side].get(layer)
                heads = maps.detach().float().mean(dim=1, keepdim=True)
                self.shown_maps[side][layer] = heads + (summed if summed is not None else 0)
        fused = self._fuse_cross(source, edit)
        return torch.cat([probs[:-num_frames], fused]) if probs.shape[0] > num_frames else fused

    def _fuse_cross(self, source: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        p = self.plan
        return apply_cross_fusion(
            source, edit, mapper=p.mapper, alphas=p.alphas, replace=p.replace, equalizer=p.equalizer
        )

    def attend(self, call: SelfAttention, *, layer: str) -> torch.Tensor:
        """Self-attention with the source's attention on the edit's values, never forming a map (see above)."""
        if not self._fusing(layer, False):
            return call.attend()
        frames = call.num_frames
        stored = self._maps[layer].to(call.value.device, call.value.dtype)
        value = call.gathered(call.value[-frames:])
        fused = F.scaled_dot_product_attention(stored.query, stored.gathered_key(), value, dropout_p=0.0, scale=call.scale)
        if self.plan.blend_tokens is not None:
            mask = self._mask(call.query.shape[2]).to(device=fused.device, dtype=fused.dtype)
            fused = mask * call.attend(slice(-frames, None)) + (1 - mask) * fused
        if call.query.shape[0] == frames:
            return fused
        return torch.cat([call.attend(slice(0, -frames)), fused])

    def _mask(self, query_len: int) -> torch.Tensor:
        """``(F, 1, query_len, 1)``: 1 where the source blend words attend (the edited object)."""
        if query_len not in self.masks:
            maps, tokens, threshold = self.blend_maps(), self.plan.blend_tokens, self.plan.blend_threshold
            grid = self.plan.grid(maps[0].shape[2])
            out = self.plan.grid(query_len)
            self.masks[query_len] = blend_mask(maps, tokens, threshold=threshold, out_res=out, in_shape=grid)
            if self.first_mask is None:
                self.first_maps = maps
                first = blend_mask(maps, tokens, threshold=threshold, out_res=grid, in_shape=grid)
                self.first_mask = first.reshape(-1, *grid)
        return self.masks[query_len]

    def blend_maps(self) -> list[torch.Tensor]:
        """This step's source cross maps at the blend resolution (or the recorded one nearest to it)."""
        maps = [self._maps[name].float() for name in self._blend_layers() if name in self._maps]
        if not maps:
            raise ValueError("blend words need recorded cross-attention maps at this step; raise record_fraction")
        return maps


def fusion_plan(
    tokenizer: PreTrainedTokenizerBase,
    source_prompt: str,
    target_prompt: str,
    num_steps: int,
    *,
    latent_shape: tuple[int, int],
    cross_replace_steps: float,
    self_replace_steps: float,
    replace: bool = False,
    reweight: Mapping[str, float] | None = None,
    blend_words: tuple[Sequence[str], Sequence[str]] | None = None,
    blend_threshold: float = 0.3,
    blend_resolution: int | None = None,
    blend_latents: bool = False,
) -> tuple[FusionPlan, str]:
    """Turn one edit's options into per-step windows and token maps (methods.md 1.7-1.9).

    Token positions come from the prompt whose maps they index: the Refine mapper sends target
    tokens to source tokens, the equaliser scales target-prompt columns, the self-attention blend
    words (``blend_words[0]``) are looked up in the source prompt (their mask comes from the
    inversion's maps), the latent-blend target words (``blend_words[1]``) in the target prompt.

    Args:
        tokenizer: The pipeline's CLIP tokenizer.
        source_prompt, target_prompt: The inversion's and the edit's prompts.
        num_steps: ``T``, the inversion's step count.
        latent_shape: ``(h, w)`` of the latents.
        cross_replace_steps, self_replace_steps: Window fractions, see ``step_window``.
        replace: Prompt-to-Prompt Replace; used only when the prompts have the same number of
            space-separated words, else Refine, as FateZero does.
        reweight: Target word -> factor on its cross-attention columns.
        blend_words: ``(source words, target words)`` of a local edit, or None (style edit).
        blend_threshold: ``tau`` of the blend mask.
        blend_resolution: Side of the cross maps the mask comes from; None: a quarter of the latent width.
        blend_latents: Also blend latents in FateZero's window ``(0.2T, 0.8T)`` of its step counter.

    Returns:
        ``(plan, fusion)``: ``fusion`` names the operator used, ``"replace"``, ``"refine"``, or
        ``"refine (replace needs the same word count)"`` when Replace fell back.

    Raises:
        ValueError: ``blend_latents`` without ``blend_words``, or a word is not in its prompt.
    """
    if blend_latents and blend_words is None:
        raise ValueError("blend_latents needs blend_words: give (source words, target words)")
    plan = FusionPlan(
        num_steps=num_steps,
        cross_window=step_window(num_steps, cross_replace_steps),
        self_window=step_window(num_steps, self_replace_steps),
        blend_threshold=blend_threshold,
        blend_resolution=blend_resolution or max(1, latent_shape[1] // 4),
        latent_shape=latent_shape,
    )
    fusion = "refine"
    if replace and len(source_prompt.split()) == len(target_prompt.split()):
        plan.replace, fusion = replace_matrix(tokenizer, source_prompt, target_prompt), "replace"
    else:
        if replace:
            fusion = "refine (replace needs the same word count)"
        plan.mapper, plan.alphas = refine_mapper(tokenizer, source_prompt, target_prompt)
    if reweight:
        plan.equalizer = equalizer(tokenizer, target_prompt, list(reweight), list(reweight.values()))
    if blend_words is not None:
        plan.blend_tokens = [i for w in blend_words[0] for i in word_token_indices(tokenizer, source_prompt, w)]
    if blend_latents:
        # FateZero's counter is the step number plus one and blends while it is in (0.2T, 0.8T).
        window = torch.zeros(num_steps, dtype=torch.bool)
        window[int(0.2 * num_steps) : max(int(0.2 * num_steps), int(0.8 * num_steps) - 1)] = True
        plan.latent_window = window
        plan.target_tokens = [i for w in blend_words[1] for i in word_token_indices(tokenizer, target_prompt, w)]
    return plan, fusion


def word_heatmaps(controller: FusionController, words: Sequence[Sequence[int]]) -> torch.Tensor:
    """Each word's source cross-attention at the step of the first blend mask, for display.

    Per word: the maps the first mask came from (``controller.first_maps``), mean over heads, summed
    over the word's tokens, mean over layers, divided by each frame's maximum.

    Args:
        controller: A fusion controller that has made its first blend mask.
        words: Token positions (source prompt) of each word.

    Returns:
        ``(W, F, r_h, r_w)`` float32 on the CPU, each frame's maximum 1 (0 where a frame has no attention).

    Raises:
        ValueError: The controller has made no blend mask yet.
    """
    if not controller.first_maps:
        raise ValueError("the controller has made no blend mask yet, so there are no maps to show")
    return _word_maps(controller.first_maps, words, controller.plan)


def fused_word_maps(controller: FusionController, side: str, words: Sequence[Sequence[int]]) -> torch.Tensor:
    """Each word's cross-attention summed over the steps that fused it, for display: ``side`` ``"source"`` (the
    inversion's stored maps; token positions of the source prompt) or ``"target"`` (the edit's own maps before
    fusion; positions of the target prompt). Mean over heads, summed over the word's tokens, mean over the
    layers at the blend resolution, divided by each frame's maximum.

    Returns:
        ``(W, F, r_h, r_w)`` float32 on the CPU, each frame's maximum 1 (0 where a frame has no attention).

    Raises:
        ValueError: No step fused cross-attention at the blend resolution (nothing was recorded to fuse).
    """
    maps = list(controller.shown_maps[side].values())
    if not maps:
        raise ValueError("no step fused cross-attention at the blend resolution, so there are no maps to show")
    return _word_maps(maps, words, controller.plan)


def _word_maps(maps: Sequence[torch.Tensor], words: Sequence[Sequence[int]], plan: FusionPlan) -> torch.Tensor:
    per_word = []
    for tokens in words:
        heat = torch.stack([m.mean(dim=1)[..., list(tokens)].sum(-1) for m in maps]).mean(0)
        heat = heat.reshape(-1, *plan.grid(heat.shape[-1]))
        per_word.append(heat / heat.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12))
    return torch.stack(per_word).cpu().float()
