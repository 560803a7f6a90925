"""Prompt encoding with a CLIP text tower, as Stable Diffusion conditions its UNet."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:  # noqa: ANN001
    """Last hidden states ``(N, L, D)`` of padded prompts (L = the tokenizer's max length, 77 for SD)."""
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(text_encoder.device))[0]
