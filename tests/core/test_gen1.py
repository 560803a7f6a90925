"""Gen-1's sampling loop on a tiny depth UNet and ControlNet (methods.md 3.8)."""

from __future__ import annotations

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
