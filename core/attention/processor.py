"""Spatio-temporal attention for an image UNet run on video frames, as a diffusers attention processor.

A video of ``F`` frames goes through ``UNet2DConditionModel`` as a batch of ``B*F`` images (``B = 2``
under classifier-free guidance, rows ``[uncond frames; cond frames]``), frames contiguous per batch
element. FateZero (Qi et al. 2023, §3.2; code: FateZero models/attention.py SparseCausalAttention)
inflates every self-attention so that frame ``i`` queries with its own tokens but takes keys and
values from a few key frames, whose token sequences are concatenated:
``K_i = [W_K z_j for j in keys(i)]``, ``V_i`` likewise. The paper writes ``keys(i) = (i, mid)``;
its released zero-shot configs use ``(mid,)`` alone. Both are a ``frame_keys`` value here.

``FrameAttnProcessor`` does that for ``attn1`` and, for any layer an ``AttentionController`` asks
for, computes the softmax probabilities explicitly and lets the controller read or replace them
before they weigh the values (Prompt-to-Prompt's edits, FateZero's cross-attention). A controller
with an ``attend`` method (a ``TokenController``) instead takes self-attention over from its tokens
(``SelfAttention``): FateZero records queries and keys and replays fusion through
``F.scaled_dot_product_attention``, so no ``Nq x Nk`` self-attention map is ever materialised.
Everywhere else it calls ``F.scaled_dot_product_attention`` and never materialises probabilities.
With no frame keys and no controller it computes exactly what diffusers' ``AttnProcessor2_0`` does.

Notation: ``B`` batch elements (prompts), ``F`` frames, ``h`` heads, ``d`` head dim,
``Nq`` query tokens per frame, ``Nk`` key tokens (``Nq * len(frame_keys)`` for cross-frame
self-attention, ``Nq`` for per-frame self-attention, the text length for cross-attention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

FrameKey = str | int
"""A named key frame (see ``FRAME_KEYS``) or an int offset ``r``: frame ``clip(i + r, 0, F - 1)``."""

# Each maps the frame indices ``i`` (shape ``(F,)``) and ``F`` to the key frame of each frame.
FRAME_KEYS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "self": lambda i, n: i,
    "first": lambda i, n: torch.zeros_like(i),
    "last": lambda i, n: torch.full_like(i, n - 1),
    "mid": lambda i, n: torch.full_like(i, (n - 1) // 2),
    "previous": lambda i, n: (i - 1).clamp(min=0),
}

_SELF_SUFFIX, _CROSS_SUFFIX, _PROC_SUFFIX = ".attn1", ".attn2", ".processor"


class AttentionController(Protocol):
    """Reads or edits attention probabilities of the layers it asks for.

    The processor calls ``wants`` on every attention call; only when it returns true does it build
    the ``(B*F, h, Nq, Nk)`` probabilities (memory) and hand them to ``__call__``.
    """

    def wants(self, layer: str, is_cross: bool, query_len: int) -> bool:
        """Whether this call's probabilities must be computed and passed to ``__call__``."""
        ...

    def __call__(self, probs: torch.Tensor, *, layer: str, is_cross: bool, num_frames: int) -> torch.Tensor:
        """Return the probabilities that weigh the values.

        Args:
            probs: ``(B*F, h, Nq, Nk)``, rows ``[uncond frames; cond frames]`` under CFG, softmax
                over the last axis.
            layer: Module name of the attention layer, e.g. ``"mid_block.attentions.0.transformer_blocks.0.attn1"``.
            is_cross: True for cross-attention (keys are text tokens).
            num_frames: ``F``.

        Returns:
            Probabilities of the same shape; may be ``probs`` itself.
        """
        ...


@dataclass(frozen=True)
class SelfAttention:
    """One self-attention call's tokens after the projections, the head split and the norms.

    ``query``, ``key`` and ``value`` are ``(B*F, h, Nq, d)``, per frame: the keys and values are not
    yet gathered from the key frames, so a controller can keep the keys of the key frames alone.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    indices: torch.Tensor | None  # (F, K) key frames of every frame; None: each frame attends to itself
    scale: float
    num_frames: int

    def gathered(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (whole clips) of every frame's key frames, concatenated: ``(rows, h, K*Nq, d)``."""
        return tokens if self.indices is None else gather_heads(tokens, self.indices)

    def attend(self, rows: slice = slice(None)) -> torch.Tensor:
        """The plain attention output of the batch rows ``rows`` (whole clips, e.g. ``slice(-F, None)`` for
        the conditional one): ``(rows, h, Nq, d)``, never a probability map."""
        key, value = self.gathered(self.key[rows]), self.gathered(self.value[rows])
        return F.scaled_dot_product_attention(self.query[rows], key, value, dropout_p=0.0, scale=self.scale)


@runtime_checkable
class TokenController(Protocol):
    """A controller that takes over self-attention from its tokens instead of from probabilities."""

    def wants(self, layer: str, is_cross: bool, query_len: int) -> bool: ...

    def attend(self, call: SelfAttention, *, layer: str) -> torch.Tensor:
        """The attention output ``(B*F, h, Nq, d)`` of ``call`` (``call.attend()`` leaves it as it is)."""
        ...


def check_frame_keys(frame_keys: tuple[FrameKey, ...]) -> tuple[FrameKey, ...]:
    """Return ``frame_keys`` as a tuple, or raise ``ValueError`` naming the valid keys."""
    frame_keys = tuple(frame_keys)
    for key in frame_keys:
        # bool is an int subclass; True as an offset is almost surely a typo.
        if isinstance(key, bool) or not isinstance(key, str | int) or (isinstance(key, str) and key not in FRAME_KEYS):
            raise ValueError(f"unknown frame key {key!r}; valid: an int offset or one of {sorted(FRAME_KEYS)}")
    return frame_keys


def frame_indices(
    frame_keys: tuple[FrameKey, ...], num_frames: int, device: torch.device | None = None
) -> torch.Tensor:
    """The key frames of every frame.

    Returns:
        ``(F, K)`` long tensor, ``K = len(frame_keys)``; row ``i`` lists the frames whose tokens
        frame ``i`` attends to, in ``frame_keys`` order.
    """
    i = torch.arange(num_frames, device=device)
    columns = [
        (i + key).clamp(0, num_frames - 1) if isinstance(key, int) else FRAME_KEYS[key](i, num_frames)
        for key in check_frame_keys(frame_keys)
    ]
    return torch.stack(columns, dim=1)


def gather_heads(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Concatenate each frame's key-frame tokens along the token axis, within each batch element.

    Args:
        tokens: ``(B*F, h, N, d)``, frames contiguous per batch element.
        indices: ``(F, K)`` from ``frame_indices``.

    Returns:
        ``(B*F, h, K*N, d)``; row ``b*F + i`` is ``[tokens[b*F + j] for j in indices[i]]`` concatenated
        along the tokens.
    """
    batch, heads, length, dim = tokens.shape
    num_frames, num_keys = indices.shape
    if batch % num_frames:
        raise ValueError(f"batch of {batch} is not a whole number of {num_frames}-frame clips")
    per_clip = tokens.view(batch // num_frames, num_frames, heads, length, dim)[:, indices.to(tokens.device)]
    return per_clip.permute(0, 1, 3, 2, 4, 5).reshape(batch, heads, num_keys * length, dim)


class FrameAttnProcessor:
    """Diffusers attention processor with cross-frame keys for ``attn1`` and controller hooks for both.

    Args:
        layer: Module name of the ``Attention`` it is set on (passed to the controller).
        frame_keys: Key frames for self-attention (see ``FrameKey``); empty means per-frame attention.
            Ignored for cross-attention.
        controller: Sees the probabilities of the calls for which ``controller.wants(...)`` is true; a
            ``TokenController`` takes those self-attention calls over from their tokens instead.

    Attributes:
        num_frames: ``F``; set with ``set_num_frames`` before each UNet call. Needed whenever frames
            are gathered or a controller is called; left ``None`` it raises rather than silently
            treating each image as its own clip.
        cross_frame: Whether self-attention reads its key frames (video mode, the default) or only its
            own frame (image mode); switched with ``set_cross_frame`` between calls, so one UNet makes
            both of Gen-1's predictions without reinstalling processors.
    """

    def __init__(
        self,
        layer: str,
        frame_keys: tuple[FrameKey, ...] = (),
        controller: AttentionController | None = None,
    ) -> None:
        self.layer = layer
        self.frame_keys = check_frame_keys(frame_keys)
        self.controller = controller
        self.num_frames: int | None = None
        self.cross_frame = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, frame_keys={self.frame_keys!r})"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """Attention of ``hidden_states`` ``(B*F, Nq, C)`` or ``(B*F, C, H, W)``; returns the same shape."""
        # 1. Input norms and layout, in AttnProcessor2_0's order.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        is_cross = encoder_hidden_states is not None

        # 2. Projections; the key frames are gathered after to_k/to_v, which act per token, so each
        # frame is projected once however many frames use it as a key.
        query = attn.to_q(hidden_states)
        if not is_cross:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        indices = None
        if self.frame_keys and self.cross_frame and not is_cross:
            if attention_mask is not None:
                raise NotImplementedError("attention masks are not supported with cross-frame self-attention")
            indices = frame_indices(self.frame_keys, self._frames(), device=key.device)

        # 3. Heads: (B*F, N, h*d) -> (B*F, h, N, d). Key frames are gathered after the head split, so a
        # token controller sees each frame's own keys, and each frame is projected once however many use it.
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # 4. Attention: a token controller takes self-attention over from its tokens; explicit
        # probabilities only where a controller asks for them.
        wanted = self.controller is not None and self.controller.wants(self.layer, is_cross, query.shape[2])
        if wanted and not is_cross and isinstance(self.controller, TokenController):
            if attention_mask is not None:
                raise NotImplementedError("attention masks are not supported with a token controller")
            call = SelfAttention(query, key, value, indices, attn.scale, self._frames())
            hidden_states = self.controller.attend(call, layer=self.layer)
        else:
            if indices is not None:
                key, value = gather_heads(key, indices), gather_heads(value, indices)
            if attention_mask is not None:
                # (B*F*h, 1 or Nq, Nk), the layout get_attention_scores takes.
                attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            if wanted:
                hidden_states = self._controlled_attention(attn, query, key, value, attention_mask, is_cross)
            else:
                if attention_mask is not None:
                    attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
                # attn.scale equals SDPA's default d^-0.5 wherever diffusers picks AttnProcessor2_0
                # (scale_qk); passing it keeps this path equal to the explicit one.
                hidden_states = F.scaled_dot_product_attention(
                    query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale
                )

        # 5. Output projection and layout, as AttnProcessor2_0.
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _controlled_attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        is_cross: bool,
    ) -> torch.Tensor:
        """softmax(q k^T * scale) through the controller, times V: ``(B*F, h, Nq, d)``."""
        batch, heads, query_len, head_dim = query.shape
        key_len = key.shape[2]
        # get_attention_scores honours upcast_attention / upcast_softmax like the classic AttnProcessor.
        probs = attn.get_attention_scores(
            query.reshape(batch * heads, query_len, head_dim),
            key.reshape(batch * heads, key_len, head_dim),
            attention_mask,
        ).view(batch, heads, query_len, key_len)
        probs = self.controller(probs, layer=self.layer, is_cross=is_cross, num_frames=self._frames())
        if probs.shape != (batch, heads, query_len, key_len):
            raise ValueError(
                f"controller returned probabilities of shape {tuple(probs.shape)} for layer {self.layer!r}; "
                f"expected {(batch, heads, query_len, key_len)}"
            )
        return torch.matmul(probs.to(value.dtype), value)

    def _frames(self) -> int:
        if self.num_frames is None:
            raise RuntimeError(f"{self.layer}: call set_num_frames(unet, F) before running the UNet")
        return self.num_frames


def install_frame_processors(
    unet: UNet2DConditionModel,
    *,
    frame_keys: tuple[FrameKey, ...] = (),
    min_channels: int = 0,
    controller: AttentionController | None = None,
    cross_attention: bool = True,
) -> dict[str, FrameAttnProcessor]:
    """Put a ``FrameAttnProcessor`` on every ``attn1`` and ``attn2`` of ``unet``; keep other processors.

    Args:
        unet: A ``UNet2DConditionModel`` (any diffusers model with ``attn_processors`` works, e.g.
            a ``ControlNetModel``, whose frames must see the same key frames).
        frame_keys: Key frames of the self-attention layers.
        min_channels: ``attn1`` layers narrower than this (``attn.to_q.in_features``) stay per-frame,
            like FateZero's ``least_sc_channel`` (640 in its zero-shot configs: the 64x64 level stays
            spatial-only).
        controller: Shared by every new processor.
        cross_attention: Also take over ``attn2``; False leaves the cross-attention processors as they
            are (an IP-Adapter's, which carry its image tokens).

    Returns:
        The new processors by layer name (the processor key without ``".processor"``).
    """
    frame_keys = check_frame_keys(frame_keys)
    processors = dict(unet.attn_processors)
    installed: dict[str, FrameAttnProcessor] = {}
    for name in processors:
        layer = name.removesuffix(_PROC_SUFFIX)
        if not layer.endswith((_SELF_SUFFIX, _CROSS_SUFFIX) if cross_attention else _SELF_SUFFIX):
            continue
        wide = unet.get_submodule(layer).to_q.in_features >= min_channels
        keys = frame_keys if layer.endswith(_SELF_SUFFIX) and wide else ()
        installed[layer] = processors[name] = FrameAttnProcessor(layer, keys, controller)
    unet.set_attn_processor(processors)
    return installed


def set_num_frames(unet: UNet2DConditionModel, num_frames: int) -> None:
    """Tell every ``FrameAttnProcessor`` of ``unet`` that its batch holds ``num_frames``-frame clips."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1; got {num_frames}")
    for processor in unet.attn_processors.values():
        if isinstance(processor, FrameAttnProcessor):
            processor.num_frames = num_frames


def set_cross_frame(unet: UNet2DConditionModel, enabled: bool) -> None:
    """Video mode (self-attention reads the key frames) or image mode (each frame alone) for every
    ``FrameAttnProcessor`` of ``unet``."""
    for processor in unet.attn_processors.values():
        if isinstance(processor, FrameAttnProcessor):
            processor.cross_frame = enabled


def restore_default_processors(unet: UNet2DConditionModel) -> None:
    """Replace every ``FrameAttnProcessor`` by diffusers' ``AttnProcessor2_0``; keep other processors."""
    processors = {
        name: AttnProcessor2_0() if isinstance(processor, FrameAttnProcessor) else processor
        for name, processor in unet.attn_processors.items()
    }
    unet.set_attn_processor(processors)
