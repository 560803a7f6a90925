"""An IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image
Diffusion Models") on a shared UNet for the length of a block, the UNet as it was afterwards.

The adapter projects a CLIP image embedding to a few extra tokens (``image_proj``) and gives every
cross-attention layer its own key and value projections for them; a layer's output is its text
attention plus ``scale`` times its attention over the image tokens (decoupled cross-attention). It
is installed with diffusers' own processors (``IPAdapterAttnProcessor2_0``) and image projection,
so a UNet carrying it is called as diffusers calls one: ``added_cond_kwargs={"image_embeds":
[embeds (B, 1, E)]}``, zeros for classifier-free guidance's unconditional rows.

Layers are matched as the adapter's authors number them: every attention processor of the UNet in
order, self-attention even and cross-attention odd, so the ``k``-th cross-attention layer has id
``2k + 1``. Self-attention processors are left alone (cross-frame ones included).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

from reelflow.core.models.ip_adapter_family import IPAdapterWeights
from reelflow.schemas.errors import ModelError

IP_IMAGE_PROJ = "ip_image_proj"  # diffusers' encoder_hid_dim_type of a UNet carrying IP-Adapters


@contextmanager
def ip_adapter(unet: Any, adapter: IPAdapterWeights, scale: float = 1.0) -> Iterator[None]:
    """``adapter`` on ``unet``'s cross-attention at ``scale`` inside the block, in the UNet's dtype and on its
    device; its processors, image projection and config restored after, also when the block raises. Hold the
    model's lock: the UNet is shared.

    Raises:
        ModelError: The adapter was made for another UNet (layer count or widths differ); nothing is changed.
    """
    if unet.config.encoder_hid_dim_type is not None:
        raise ModelError(f"this UNet already projects its conditioning ({unet.config.encoder_hid_dim_type!r}); an "
                         "IP-Adapter needs a plain text-conditioned UNet (SD 1.5)")  # fmt: skip
    adapter = adapter.to(unet.device, unet.dtype)
    processors, original = dict(unet.attn_processors), unet.encoder_hid_proj
    installed = {**processors, **_adapter_processors(unet, processors, adapter, scale)}  # built before anything changes
    projection = MultiIPAdapterImageProjection([_image_projection(adapter)])
    try:
        unet.set_attn_processor(installed)
        unet.encoder_hid_proj = projection
        unet.register_to_config(encoder_hid_dim_type=IP_IMAGE_PROJ)
        yield
    finally:
        unet.set_attn_processor(processors)
        unet.encoder_hid_proj = original
        unet.register_to_config(encoder_hid_dim_type=None)


def image_embed_kwargs(unet: Any, image_embeds: torch.Tensor | None) -> dict[str, Any]:
    """The UNet keywords that hand its IP-Adapter the image embeddings ``(B, 1, E)``; none without one.

    Raises:
        ValueError: Embeddings for a UNet without an adapter (they would be ignored), or none for one with.
    """
    carries = getattr(getattr(unet, "config", None), "encoder_hid_dim_type", None) == IP_IMAGE_PROJ
    if (image_embeds is not None) != carries:
        raise ValueError("image embeddings go with an IP-Adapter on the UNet: install one with ip_adapter() and pass "
                         "both, or neither")  # fmt: skip
    if image_embeds is None:
        return {}
    return {"added_cond_kwargs": {"image_embeds": [image_embeds.to(unet.device, unet.dtype)]}}


def _adapter_processors(
    unet: Any, processors: dict[str, Any], adapter: IPAdapterWeights, scale: float
) -> dict[str, IPAdapterAttnProcessor2_0]:  # fmt: skip
    cross = [name for name in processors if not name.endswith("attn1.processor")]
    if len(cross) != len(adapter.layers):
        raise ModelError(f"the IP-Adapter has {len(adapter.layers)} cross-attention layers but the UNet has {len(cross)}: "
                         "it was made for another base model; pick the adapter file made for this UNet's "
                         "(ip-adapter_sd15 for SD 1.5)")  # fmt: skip
    installed = {}
    for name, (to_k, to_v) in zip(cross, adapter.layers, strict=True):
        attention = unet.get_submodule(name.removesuffix(".processor"))
        hidden, width = attention.to_k.out_features, attention.to_k.in_features
        if tuple(to_k.shape) != (hidden, width):
            raise ModelError(f"the IP-Adapter's layer for {name} maps {to_k.shape[1]} to {to_k.shape[0]} features but the "
                             f"UNet's maps {width} to {hidden}: it was made for another base model; pick the adapter "
                             "file made for this UNet's (ip-adapter_sd15 for SD 1.5)")  # fmt: skip
        processor = IPAdapterAttnProcessor2_0(hidden, width, num_tokens=(adapter.num_tokens,), scale=scale)
        processor.load_state_dict({"to_k_ip.0.weight": to_k, "to_v_ip.0.weight": to_v})
        installed[name] = processor.to(device=to_k.device, dtype=to_k.dtype)
    return installed


def _image_projection(adapter: IPAdapterWeights) -> ImageProjection:
    proj = adapter.image_proj
    projection = ImageProjection(adapter.image_embed_dim, adapter.cross_attention_dim, adapter.num_tokens)
    projection.load_state_dict({"image_embeds.weight": proj["proj.weight"], "image_embeds.bias": proj["proj.bias"],
                                "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]})  # fmt: skip
    return projection.to(device=proj["proj.weight"].device, dtype=proj["proj.weight"].dtype).eval().requires_grad_(False)
