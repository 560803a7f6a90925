"""Prompt encoding with a CLIP text tower: the last hidden states Stable Diffusion conditions its UNet on, and the
projected embeddings that live in CLIP's image-text space."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:  # noqa: ANN001
    """Token ids ``(N, L)`` of the prompts, padded and cut to the tokenizer's max length (77 for CLIP)."""
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return tokens.input_ids


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:  # noqa: ANN001
    """Last hidden states ``(N, L, D)`` of padded prompts (L = the tokenizer's max length, 77 for SD)."""
    with torch.no_grad():
        return text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device))[0]


def projected_text(tokenizer, model, prompts: Sequence[str]) -> torch.Tensor:  # noqa: ANN001
    """CLIP's projected text embeddings ``(N, D)`` (float32, on the CPU), from a ``CLIPModel``
    (``get_text_features``) or a ``CLIPTextModelWithProjection`` (``text_embeds``)."""
    ids = tokenize(tokenizer, prompts).to(model.device)
    with torch.inference_mode():
        out = projected(model.get_text_features(input_ids=ids)) if hasattr(model, "get_text_features") else model(
            input_ids=ids).text_embeds  # fmt: skip
    return out.float().cpu()


def projected(out: Any) -> torch.Tensor:
    """The projected embeddings a CLIP ``get_*_features`` call returns (transformers 5: its ``pooler_output``)."""
    return getattr(out, "pooler_output", out)
