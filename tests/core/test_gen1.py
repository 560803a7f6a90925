"""Gen-1's sampling loop on a tiny depth UNet and ControlNet (methods.md 3.8)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from reelflow.core.attention.processor import install_frame_processors, restore_default_processors
from reelflow.core.editing.gen1 import Structure, edit_timesteps, gen1_denoise, sdedit_start
from reelflow.core.sampling.ddim import classifier_free_guidance, ddim_denoise_step
from reelflow.core.tiny import sd15_scheduler, tiny_unet

FRAMES = 3


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config({**tiny_unet().config, "in_channels": 5}).eval()
    install_frame_processors(model, frame_keys=("self", "first"), cross_attention=False)
    return model


def inputs(identical: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(1 if identical else FRAMES, 4, 8, 8, generator=generator).expand(FRAMES, -1, -1, -1).clone()
    depth = torch.rand(1 if identical else FRAMES, 64, 64, generator=generator).expand(FRAMES, -1, -1).clone()
    return z, depth, torch.randn(2, 77, 32, generator=generator)


def denoise(unet, z, depth, embeds, *, omega: float, omega_t: float, controlnet=None) -> torch.Tensor:
    scheduler = sd15_scheduler()
    return gen1_denoise(unet, z, embeds, Structure(depth, controlnet), scheduler, 10, edit_timesteps(scheduler, 10, 0.3),
                        omega=omega, omega_t=omega_t)  # fmt: skip


def test_omega_t_zero_is_per_frame_guidance(unet) -> None:
    z, depth, embeds = inputs()
    scheduler, ours = sd15_scheduler(), denoise(unet, z, depth, embeds, omega=7.5, omega_t=0.0)
    restore_default_processors(unet)  # the stock per-frame UNet
    concat = Structure(depth).concat_channel((8, 8))
    x = z
    for t in edit_timesteps(scheduler, 10, 0.3):
        with torch.no_grad():
            text = embeds[:, None].expand(-1, FRAMES, -1, -1).reshape(2 * FRAMES, 77, 32)
            eps = unet(torch.cat([torch.cat([x, concat], 1)] * 2), t, encoder_hidden_states=text).sample
        x = ddim_denoise_step(classifier_free_guidance(*eps.chunk(2), 7.5), t, x, scheduler, 10)
    install_frame_processors(unet, frame_keys=("self", "first"), cross_attention=False)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_video_mode_changes_the_edit_and_omega_t_weighs_it(unet) -> None:
    z, depth, embeds = inputs()
    per_frame = denoise(unet, z, depth, embeds, omega=7.5, omega_t=0.0)
    video = denoise(unet, z, depth, embeds, omega=7.5, omega_t=1.0)
    smoother = denoise(unet, z, depth, embeds, omega=7.5, omega_t=2.0)
    assert not torch.allclose(per_frame, video, atol=1e-4) and not torch.allclose(video, smoother, atol=1e-4)


def test_identical_frames_make_the_temporal_term_vanish(unet) -> None:
    z, depth, embeds = inputs(identical=True)
    per_frame = denoise(unet, z, depth, embeds, omega=7.5, omega_t=0.0)
    torch.testing.assert_close(denoise(unet, z, depth, embeds, omega=7.5, omega_t=2.0), per_frame, rtol=1e-4, atol=1e-4)


def test_sdedit_start_is_the_forward_process() -> None:
    z0, noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    torch.testing.assert_close(sdedit_start(z0, noise, 0.64), 0.8 * z0 + 0.6 * noise)
    scheduler = sd15_scheduler()
    assert len(edit_timesteps(scheduler, 10, 0.3)) == 3 and len(edit_timesteps(scheduler, 10, 1.0)) == 10


def test_the_controlnet_path_conditions_on_the_depth_image() -> None:
    torch.manual_seed(0)
    unet = tiny_unet().eval()
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).eval()
    for parameter in controlnet.parameters():  # its output convolutions start at zero: make them speak
        if not parameter.any():
            torch.nn.init.normal_(parameter, std=0.05)
    install_frame_processors(unet, frame_keys=("self", "first"), cross_attention=False)
    z, depth, embeds = inputs()
    one = denoise(unet, z, depth, embeds, omega=7.5, omega_t=1.0, controlnet=controlnet)
    other = denoise(unet, z, 1 - depth, embeds, omega=7.5, omega_t=1.0, controlnet=controlnet)
    assert one.shape == z.shape and not torch.allclose(one, other, atol=1e-5)


class ConstantUnet:
    """A 'UNet' whose noise prediction does not depend on the latents: DDIM inversion then denoising with it
    must return the clean latents exactly, so every level of the walk lines up."""

    device, dtype, attn_processors = torch.device("cpu"), torch.float32, {}

    def __call__(self, sample, t, encoder_hidden_states, **kwargs):
        one = sample[:1, :4]
        eps = torch.sin(torch.arange(one.numel(), dtype=torch.float32) * 0.37 + t).view(one.shape)
        return type("Out", (), {"sample": eps.expand(sample.shape[0], -1, -1, -1)})()


def test_inversion_then_denoising_returns_the_source_and_the_blend_levels_line_up() -> None:
    from reelflow.core.editing.gen1 import Blend, gen1_invert

    scheduler, unet = sd15_scheduler(), ConstantUnet()
    z0, depth, embeds = inputs()
    timesteps = edit_timesteps(scheduler, 10, 0.5)
    levels = gen1_invert(unet, z0, embeds[:1], Structure(depth), scheduler, 10, timesteps)
    assert len(levels) == len(timesteps) + 1
    # omega = 1, omega_t = 0: the conditional per-frame prediction, the one the inversion used (same eps here).
    back = gen1_denoise(unet, levels[-1], embeds, Structure(depth), scheduler, 10, timesteps, omega=1.0, omega_t=0.0)
    torch.testing.assert_close(back, z0, rtol=1e-4, atol=1e-4)
    seen: list[torch.Tensor] = []

    def source(index: int, alpha_prod: float) -> torch.Tensor:
        seen.append(levels[len(levels) - 2 - index])
        return seen[-1]

    keep_all = Blend(torch.zeros(1, 1, 8, 8), source)  # mask 0: every step returns the source's own level
    kept = gen1_denoise(unet, levels[-1], embeds, Structure(depth), scheduler, 10, timesteps, omega=7.5, omega_t=0.0,
                        blend=keep_all)  # fmt: skip
    torch.testing.assert_close(kept, z0)
    assert len(seen) == len(timesteps)


def test_the_concat_condition_maps_the_clips_range_to_minus_one_one() -> None:
    depth = torch.rand(3, 64, 64) * 0.4 + 0.3
    channel = Structure(depth, span=(float(depth.min()), float(depth.max()))).concat_channel((64, 64))
    assert channel.min() == pytest.approx(-1.0) and channel.max() == pytest.approx(1.0)


@pytest.mark.parametrize("keys", [("self",), ("self", "first", "mid"), ("first", 1)])
def test_frame_keys_that_would_change_the_anchor_between_windows_are_refused(keys) -> None:
    from reelflow.schemas.gen1 import Gen1Params

    with pytest.raises(ValueError, match="must include 'first'"):
        Gen1Params(frame_keys=keys)


def test_per_frame_editing_is_diffusers_controlnet_pipeline() -> None:
    """omega_t = 0 from noise (strength 1): each frame is edited exactly as StableDiffusionControlNetPipeline would."""
    from diffusers import StableDiffusionControlNetPipeline

    from reelflow.core.tiny import tiny_pipeline

    pipe = tiny_pipeline(0)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).eval()
    for parameter in controlnet.parameters():
        if not parameter.any():
            torch.nn.init.normal_(parameter, std=0.05)
    z, depth, embeds = inputs()
    stock = StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, controlnet=controlnet,
        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    stock.set_progress_bar_config(disable=True)
    theirs = stock(prompt_embeds=embeds[1:].expand(FRAMES, -1, -1), negative_prompt_embeds=embeds[:1].expand(FRAMES, -1, -1),
                   image=depth[:, None].expand(-1, 3, -1, -1), height=64, width=64, num_inference_steps=5,
                   guidance_scale=7.5, latents=z.clone(), output_type="latent").images  # fmt: skip
    install_frame_processors(pipe.unet, frame_keys=("self", "first"), cross_attention=False)
    ours = gen1_denoise(pipe.unet, z, embeds, Structure(depth, controlnet), pipe.scheduler, 5,
                        edit_timesteps(pipe.scheduler, 5, 1.0), omega=7.5, omega_t=0.0)  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_per_frame_editing_with_an_ip_adapter_is_diffusers_pipeline_with_its_loaded_adapter(tmp_path) -> None:
    """The reference image's tokens reach every pass as diffusers' IP-Adapter loading gives them; at scale 0 they add nothing."""
    from diffusers import StableDiffusionControlNetPipeline

    from reelflow.core.attention.ip_adapter import ip_adapter
    from reelflow.core.models import load_model
    from reelflow.core.tiny import tiny_pipeline
    from reelflow.core.tiny_gen1 import IP_ADAPTER_WEIGHTS, build_tiny_ip_adapter

    pipe, adapter_dir = tiny_pipeline(0), build_tiny_ip_adapter(tmp_path / "ip")
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 16, 16)).eval()
    z, depth, embeds = inputs()
    image = torch.cat([torch.zeros(1, 1, 32), torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(3))])
    ours_unet = UNet2DConditionModel.from_config(pipe.unet.config).eval()
    ours_unet.load_state_dict(pipe.unet.state_dict())
    stock = StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, controlnet=controlnet,
        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    stock.set_progress_bar_config(disable=True)
    stock.load_ip_adapter(str(adapter_dir), subfolder="models", weight_name="ip-adapter_sd15.safetensors", image_encoder_folder=None)
    stock.set_ip_adapter_scale(0.7)
    theirs = stock(prompt_embeds=embeds[1:].expand(FRAMES, -1, -1), negative_prompt_embeds=embeds[:1].expand(FRAMES, -1, -1),
                   ip_adapter_image_embeds=[image.repeat_interleave(FRAMES, dim=0)], image=depth[:, None].expand(-1, 3, -1, -1),
                   height=64, width=64, num_inference_steps=5, guidance_scale=7.5, latents=z.clone(), output_type="latent").images  # fmt: skip
    weights = load_model(str(adapter_dir), family="ip_adapter", weight_name=IP_ADAPTER_WEIGHTS)
    install_frame_processors(ours_unet, frame_keys=("self", "first"), cross_attention=False)

    def edit(scale: float | None) -> torch.Tensor:
        with ip_adapter(ours_unet, weights, scale or 0.0) if scale is not None else contextlib.nullcontext():
            install_frame_processors(ours_unet, frame_keys=("self", "first"), cross_attention=False)
            return gen1_denoise(ours_unet, z, embeds, Structure(depth, controlnet), sd15_scheduler(), 5,
                                edit_timesteps(pipe.scheduler, 5, 1.0), omega=7.5, omega_t=0.0,
                                image_embeds=image if scale is not None else None)  # fmt: skip

    torch.testing.assert_close(edit(0.7), theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(edit(0.0), edit(None), rtol=1e-5, atol=1e-5)
    # omega = omega_t = 1 keeps the video prediction alone: the reference must reach the cross-frame pass too.
    other = torch.cat([image[:1], -image[1:]])
    with ip_adapter(ours_unet, weights):
        install_frame_processors(ours_unet, frame_keys=("self", "first"), cross_attention=False)
        video = [gen1_denoise(ours_unet, z, embeds, Structure(depth, controlnet), sd15_scheduler(), 5,
                              edit_timesteps(pipe.scheduler, 5, 1.0), omega=1.0, omega_t=1.0, image_embeds=e)
                 for e in (image, other)]  # fmt: skip
    assert (video[0] - video[1]).abs().max() > 1e-3
