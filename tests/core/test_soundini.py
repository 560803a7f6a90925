"""Soundini's sampler on tiny SD parts and a tiny guided-diffusion ADM (methods.md 5.8: items 3 and 4): blending keeps
the noised source outside the region exactly, a guided step lowers the sound loss, chunks see their neighbour."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from reelflow.core.editing.gen1 import edit_timesteps
from reelflow.core.editing.soundini import Region, soundini_denoise
from reelflow.core.guidance.sound import sound_loss
from reelflow.core.tiny import tiny_clip_vision, tiny_pipeline

FRAMES = 3


def setup(seed: int = 0, backbone: str = "sd", tmp_path=None):  # noqa: ANN001, ANN201
    """SD's latents ``(F, 4, 8, 8)`` with its VAE and an empty prompt, or the pixel model's frames ``(F, 3, 8, 8)``."""
    if backbone == "sd":
        pipe, channels, embeds = tiny_pipeline(0), 4, torch.zeros(1, 77, 32)
    else:
        from reelflow.core.models.base import ModelSource
        from reelflow.core.models.guided_diffusion_family import GuidedDiffusionFamily
        from reelflow.core.tiny_adm import build_tiny_adm

        source = ModelSource("tiny", path=build_tiny_adm(tmp_path / "adm"))
        family = GuidedDiffusionFamily()
        pipe = SimpleNamespace(unet=family.load(source), vae=None, scheduler=family.load(source, component="scheduler"))
        channels, embeds = 3, None
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(FRAMES, channels, 8, 8, generator=generator)
    mask = torch.zeros(FRAMES, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    noise = torch.randn(1, channels, 8, 8, generator=generator).expand(FRAMES, -1, -1, -1)  # one noise for every frame
    return pipe, Region(mask, source, noise), embeds


def start(pipe, region: Region, strength: float, steps: int):  # noqa: ANN001, ANN201
    timesteps = edit_timesteps(pipe.scheduler, steps, strength)
    return timesteps, region.noised(slice(None), float(pipe.scheduler.alphas_cumprod[timesteps[0]]))


@pytest.mark.parametrize("backbone", ["sd", "adm"])
def test_outside_the_region_every_step_holds_the_source_at_its_level_exactly(backbone: str, tmp_path) -> None:
    from reelflow.core.sampling.ddim import step_alphas

    pipe, region, embeds = setup(backbone=backbone, tmp_path=tmp_path)
    timesteps, z = start(pipe, region, 0.6, 5)
    outside = region.mask.expand_as(region.source) == 0
    seen = []

    def check(i: int, latents: torch.Tensor) -> None:
        expected = region.noised(slice(None), step_alphas(pipe.scheduler, timesteps[i], 5)[1])
        assert torch.equal(latents[outside], expected[outside])
        seen.append(i)

    pull = lambda pixels, frames, anchored, step: pixels.square().mean()  # noqa: E731  (any guidance at all)
    soundini_denoise(pipe.unet, pipe.vae, z, embeds, pipe.scheduler, 5, timesteps, region, pull, chunk=2, on_step=check)
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("backbone", ["sd", "adm"])
def test_a_guided_step_lowers_the_sound_loss_against_the_unguided_step(backbone: str, tmp_path) -> None:
    pipe, region, embeds = setup(backbone=backbone, tmp_path=tmp_path)
    clip = tiny_clip_vision()
    target = torch.randn(FRAMES, 16, generator=torch.Generator().manual_seed(5))
    region = Region(torch.ones_like(region.mask), region.source, region.noise)
    timesteps, z = start(pipe, region, 0.6, 5)

    def loss_after_one_step(weight: float) -> float:
        recorded = {}

        def losses(pixels: torch.Tensor, frames: slice, anchored: bool, step: int) -> torch.Tensor:
            small = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False)
            loss = sound_loss(clip(pixel_values=small).image_embeds, target[frames]).sum()
            recorded[step] = float(loss.detach())
            return loss * (weight if step == 0 else 0.0)

        soundini_denoise(pipe.unet, pipe.vae, z, embeds, pipe.scheduler, 5, timesteps[:2], region, losses, chunk=FRAMES)
        return recorded[1]

    assert loss_after_one_step(200.0) < loss_after_one_step(0.0)


def test_each_chunk_is_guided_with_its_previous_frame() -> None:
    pipe, region, embeds = setup()
    timesteps, z = start(pipe, region, 0.4, 5)
    seen = []

    def losses(pixels: torch.Tensor, frames: slice, anchored: bool, step: int) -> torch.Tensor:
        seen.append((frames.start, frames.stop, len(pixels), anchored))
        return pixels.mean()

    soundini_denoise(pipe.unet, pipe.vae, z, embeds, pipe.scheduler, 5, timesteps[:1], region, losses, chunk=2)
    assert seen == [(0, 2, 2, False), (1, 3, 2, True)]  # the second chunk (frame 2) also decodes frame 1's estimate
    seen.clear()
    soundini_denoise(pipe.unet, pipe.vae, z, embeds, pipe.scheduler, 5, timesteps[:1], region, losses, chunk=1)
    assert seen == [(0, 1, 1, False), (0, 2, 2, True), (1, 3, 2, True)]  # chunks of one frame know their neighbour


def test_per_frame_losses_pull_a_frame_alike_in_any_chunk() -> None:
    pipe, region, embeds = setup()
    timesteps, z = start(pipe, region, 0.4, 5)

    def losses(pixels: torch.Tensor, frames: slice, anchored: bool, step: int) -> torch.Tensor:
        return 50.0 * pixels[int(anchored) :].square().flatten(1).mean(1).sum()  # each frame's own term, once

    one, three = (soundini_denoise(pipe.unet, pipe.vae, z, embeds, pipe.scheduler, 5, timesteps[:2], region, losses,
                                   chunk=c) for c in (1, 3))  # fmt: skip
    torch.testing.assert_close(one, three, rtol=1e-4, atol=1e-5)


def test_the_source_noised_to_a_level_is_what_diffusers_add_noise_makes() -> None:
    pipe, region, _ = setup()
    t = torch.tensor([601])
    ours = region.noised(slice(None), float(pipe.scheduler.alphas_cumprod[t]))
    torch.testing.assert_close(ours, pipe.scheduler.add_noise(region.source, region.noise, t), rtol=1e-6, atol=1e-6)
