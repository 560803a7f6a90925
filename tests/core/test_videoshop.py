"""Videoshop's pieces: Stable Video Diffusion conditioning and sampling against diffusers' pipeline,
normalisation and rescaling statistics (methods.md 2.9.3), and the colour match between windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reelflow.core.editing.videoshop import (
    ImageCondition,
    SvdDenoiser,
    added_time_ids,
    boundary_jumps,
    channel_stats,
    condition_on_image,
    guidance_ramp,
    inversion_latents,
    apply_colour_map,
    colour_map,
    fade_weights,
    normalise_latents,
    rescale_latents,
)
from reelflow.core.inversion.edm import EdmSchedule, generate
from reelflow.core.tiny import tiny_svd_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_svd_pipeline(seed=0)


def test_our_sampling_is_the_stable_video_diffusion_pipeline(pipe) -> None:
    """The same conditioning and start latents give the same latents as diffusers' pipeline, CFG ramp included."""
    generator = torch.Generator().manual_seed(0)
    frames, shape = 4, (4, 4, 8, 8)
    condition = ImageCondition(torch.randn(1, 32, generator=generator), torch.randn(4, 8, 8, generator=generator),
                               torch.zeros(4, 8, 8))  # fmt: skip
    schedule = EdmSchedule.from_scheduler(type(pipe.scheduler).from_config(pipe.scheduler.config), 5)
    start = torch.randn(shape, generator=generator) * schedule.sigmas[0]
    ours = generate(SvdDenoiser(pipe.unet, condition, added_time_ids(7, 127, 0.2), guidance=guidance_ramp(1.0, 3.0, frames)),
                    start, schedule, strength=1.0)  # fmt: skip

    # The pipeline scales given latents by init_noise_sigma, sqrt(sigma_max^2 + 1) under "leading" spacing.
    pipe._encode_image = lambda *args, **kwargs: torch.cat([torch.zeros(1, 1, 32), condition.embeds[:, None]])
    pipe._encode_vae_image = lambda *args, **kwargs: torch.cat([torch.zeros(1, 4, 8, 8), condition.latents[None]])
    theirs = pipe(Image.new("RGB", (64, 64)), height=64, width=64, num_frames=frames, num_inference_steps=5,
                  min_guidance_scale=1.0, max_guidance_scale=3.0, fps=7, motion_bucket_id=127, noise_aug_strength=0.2,
                  latents=(start / (schedule.sigmas[0] ** 2 + 1) ** 0.5)[None], output_type="latent").frames[0]  # fmt: skip
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


def test_a_guidance_of_one_is_the_conditional_output(pipe) -> None:
    condition = ImageCondition(torch.randn(1, 32), torch.randn(4, 8, 8), torch.zeros(4, 8, 8))
    guided = SvdDenoiser(pipe.unet, condition, added_time_ids(7, 127, 0.2), guidance=torch.ones(3))
    plain = SvdDenoiser(pipe.unet, condition, added_time_ids(7, 127, 0.2))
    x = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(guided(x, 2.0, 0.17), plain(x, 2.0, 0.17), rtol=1e-5, atol=1e-5)  # g = 1: conditional


def test_image_conditioning_is_the_vae_mode_and_clip_of_the_squashed_image(pipe) -> None:
    """The reference squashes the image to the CLIP size with torchvision (bilinear, antialiased) and
    CLIP-normalises it; the VAE encodes the image in [-1, 1], with noise augmentation for the concat latents."""
    from torchvision.transforms.functional import normalize, resize

    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    got = condition_on_image(image, image_encoder=pipe.image_encoder, processor=pipe.feature_extractor, vae=pipe.vae,
                             noise_aug_strength=0.0, generator=torch.Generator().manual_seed(0))  # fmt: skip
    unit = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    clip = normalize(resize(unit, [32, 32], antialias=True), pipe.feature_extractor.image_mean, pipe.feature_extractor.image_std)
    with torch.no_grad():
        latents = pipe.vae.encode(unit * 2 - 1).latent_dist.mode()[0]
        embeds = pipe.image_encoder(clip).image_embeds
    torch.testing.assert_close(got.embeds, embeds, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.latents, latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.clean, latents * 0.18215, rtol=1e-4, atol=1e-4)
    noisy = condition_on_image(image, image_encoder=pipe.image_encoder, processor=pipe.feature_extractor, vae=pipe.vae,
                               noise_aug_strength=0.2, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert not torch.allclose(noisy.latents, got.latents) and torch.equal(noisy.clean, got.clean)


@pytest.mark.parametrize(("mode", "dims"), [("per_frame", (1, 2, 3)), ("per_channel", (0, 2, 3))])
def test_normalisation_gives_unit_statistics_per_frame_or_per_channel(mode: str, dims: tuple[int, ...]) -> None:
    x0 = torch.randn(5, 4, 6, 6) * torch.linspace(0.5, 3, 5)[:, None, None, None] + torch.arange(4.0)[None, :, None, None]
    normalised, mean, std = normalise_latents(x0, mode)
    torch.testing.assert_close(normalised.mean(dim=dims), torch.zeros(normalised.mean(dim=dims).shape), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised.std(dim=dims), torch.ones(normalised.std(dim=dims).shape), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalised * (std + 1e-6) + mean, x0, atol=1e-5, rtol=1e-5)
    other = (0, 2, 3) if mode == "per_frame" else (1, 2, 3)
    assert normalised.std(dim=other).sub(1).abs().max() > 0.05  # the other axis is not normalised


def test_rescaling_gives_frame_zero_the_reference_statistics_with_one_map_for_all_frames() -> None:
    x, reference = torch.randn(4, 4, 6, 6) * 2 + 1, torch.randn(4, 6, 6) * 0.5 - 3
    y = rescale_latents(x, reference)
    torch.testing.assert_close(y[0].mean(dim=(1, 2)), reference.mean(dim=(1, 2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[0].std(dim=(1, 2)), reference.std(dim=(1, 2)), atol=1e-5, rtol=1e-5)
    ratio = (y[3] - y[1]) / (x[3] - x[1])  # frame differences only rescaled, per channel
    torch.testing.assert_close(ratio, (reference.std(dim=(1, 2)) / x[0].std(dim=(1, 2)))[:, None, None].expand(4, 6, 6),
                               rtol=1e-3, atol=1e-3)  # fmt: skip


def test_inversion_conditioning_latents_are_z_scored_then_unscaled() -> None:
    latents = torch.randn(4, 8, 8) * 3 + 2
    got = inversion_latents(latents, 0.18215) * 0.18215
    assert abs(got.mean()) < 1e-5 and got.std() == pytest.approx(1.0, abs=1e-4)


def test_time_ids_pass_fps_minus_one() -> None:
    assert added_time_ids(7, 127, 0.2).tolist() == [[6.0, 127.0, pytest.approx(0.2)]]


def test_a_colour_match_removes_a_jump_at_the_boundary() -> None:
    rng = np.random.default_rng(0)
    scene = rng.integers(40, 200, (1, 16, 16, 3)).astype(np.float32)
    drift = np.linspace(0, 6, 12)[:, None, None, None]  # a slow brightening across the clip
    clip = np.clip(scene + drift + rng.normal(0, 1, (12, 16, 16, 3)), 0, 255).round().astype(np.uint8)
    first, second = clip[:7], clip[6:].astype(np.float32) * np.array([0.8, 1.1, 0.9]) + np.array([10.0, -5.0, 3.0])
    second = np.clip(second.round(), 0, 255).astype(np.uint8)  # the later window came out tinted
    windows = [(0, 7), (6, 12)]

    def stitched(later: np.ndarray) -> np.ndarray:
        return np.concatenate([first[:6], ((first[6:].astype(np.float32) + later[:1]) / 2).round().astype(np.uint8), later[1:]])

    before = boundary_jumps(channel_stats(stitched(second)), windows)
    colour = colour_map(second[:1], first[6:])
    matched = apply_colour_map(second, colour, np.ones(len(second)))
    after = boundary_jumps(channel_stats(stitched(matched)), windows)
    assert before["boundary_max"] > 5 * before["within_max"]
    # No larger than a change between two frames inside a window, up to the frames' own noise.
    assert after["boundary_max"] <= 1.25 * after["within_max"] and colour.shape == (2, 3)
    np.testing.assert_allclose(channel_stats(matched[:1]), channel_stats(first[6:]), atol=0.6)


def test_a_fading_colour_map_joins_the_previous_window_and_leaves_the_next_one_the_raw_colours() -> None:
    np.testing.assert_allclose(fade_weights(6, 2, 2), [1, 1, 2 / 3, 1 / 3, 0, 0], atol=1e-6)
    np.testing.assert_allclose(fade_weights(4, 1, 0), [1, 0.75, 0.5, 0.25], atol=1e-6)
    frames = np.full((6, 2, 2, 3), 100, np.uint8)
    mapped = apply_colour_map(frames, np.array([[1.0, 1.0, 2.0], [10.0, 0.0, -50.0]], np.float32), fade_weights(6, 2, 2))
    assert mapped[:2, ..., 0].tolist() == [[[110, 110]] * 2] * 2 and mapped[:2, 0, 0, 2].tolist() == [150, 150]
    np.testing.assert_array_equal(mapped[4:], frames[4:])  # the frames the next window is matched to stay raw
    assert 100 < mapped[2, 0, 0, 0] < 110 and 100 < mapped[3, 0, 0, 2] < mapped[2, 0, 0, 2] < 150
