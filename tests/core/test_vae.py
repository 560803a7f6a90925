"""Chunked VAE encoding and decoding on the tiny bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder

from reelflow.core.tiny import build_tiny_bundle, build_tiny_svd
from reelflow.core.vae import decode_latents, downscale_factor, encode_frames

F, H, W = 5, 64, 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny") / "sd", seed=0)


@pytest.fixture(scope="module")
def vae(bundle: Path) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(bundle, subfolder="vae").eval()


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(F, 3, H, W, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def latents(vae: AutoencoderKL, frames: torch.Tensor) -> torch.Tensor:
    return encode_frames(vae, frames, chunk_size=F)


def test_latents_are_float32_cpu_at_one_eighth_size(latents: torch.Tensor) -> None:
    assert latents.shape == (F, 4, H // 8, W // 8)
    assert latents.dtype == torch.float32
    assert latents.device.type == "cpu"


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_chunked_encoding_equals_one_batch(
    vae: AutoencoderKL, frames: torch.Tensor, latents: torch.Tensor, chunk_size: int
) -> None:
    chunked = encode_frames(vae, frames, chunk_size=chunk_size)

    torch.testing.assert_close(chunked, latents, atol=1e-5, rtol=0)


def test_latents_are_the_scaled_posterior_mode(
    vae: AutoencoderKL, frames: torch.Tensor, latents: torch.Tensor
) -> None:
    with torch.no_grad():
        mode = vae.encode(frames).latent_dist.mode()

    torch.testing.assert_close(latents, mode * 0.18215, atol=1e-6, rtol=1e-5)


def test_shift_and_scale_are_undone_by_decoding(
    bundle: Path, vae: AutoencoderKL, frames: torch.Tensor, latents: torch.Tensor
) -> None:
    # The same weights under an SD3-style config: only the latent normalisation differs.
    shifted = AutoencoderKL.from_pretrained(
        bundle, subfolder="vae", scaling_factor=2.0, shift_factor=0.5
    ).eval()

    shifted_latents = encode_frames(shifted, frames, chunk_size=F)

    torch.testing.assert_close(shifted_latents, (latents / 0.18215 - 0.5) * 2.0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        decode_latents(shifted, shifted_latents, chunk_size=F),
        decode_latents(vae, latents, chunk_size=F),
        atol=1e-5,
        rtol=0,
    )


def test_on_chunk_sees_contiguous_ranges_covering_every_frame(
    vae: AutoencoderKL, frames: torch.Tensor
) -> None:
    seen: list[tuple[int, int, torch.Tensor]] = []

    result = encode_frames(
        vae, frames, chunk_size=2, on_chunk=lambda start, stop, z: seen.append((start, stop, z))
    )

    assert [(start, stop) for start, stop, _ in seen] == [(0, 2), (2, 4), (4, 5)]
    for start, stop, chunk in seen:
        assert torch.equal(chunk, result[start:stop])


def test_sampling_is_seeded_and_differs_from_the_mode(
    vae: AutoencoderKL, frames: torch.Tensor, latents: torch.Tensor
) -> None:
    def draw(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return encode_frames(vae, frames, chunk_size=F, sample=True, generator=generator)

    assert torch.equal(draw(1), draw(1))
    assert not torch.allclose(draw(1), draw(2))
    assert not torch.allclose(draw(1), latents)


def test_latents_are_ordinary_tensors_that_autograd_accepts(latents: torch.Tensor) -> None:
    # Null-text optimisation backpropagates through UNet calls on encoded latents.
    assert not latents.is_inference()
    assert (latents.clone().requires_grad_() * 2).sum().requires_grad


def test_decoded_frames_have_input_shape_and_range(
    vae: AutoencoderKL, latents: torch.Tensor
) -> None:
    decoded = decode_latents(vae, latents, chunk_size=2)

    assert decoded.shape == (F, 3, H, W)
    assert decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_decoding_clamps_out_of_range_values(vae: AutoencoderKL, latents: torch.Tensor) -> None:
    decoded = decode_latents(vae, latents * 50, chunk_size=F)

    assert decoded.min() >= -1 and decoded.max() <= 1
    assert (decoded.abs() == 1).any()


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_chunked_decoding_equals_one_batch(
    vae: AutoencoderKL, latents: torch.Tensor, chunk_size: int
) -> None:
    whole = decode_latents(vae, latents, chunk_size=F)
    spans: list[tuple[int, int]] = []

    chunked = decode_latents(
        vae, latents, chunk_size=chunk_size, on_chunk=lambda a, b, _: spans.append((a, b))
    )

    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    assert spans == [(start, min(start + chunk_size, F)) for start in range(0, F, chunk_size)]


def test_encoding_casts_the_input_to_the_vae_dtype(
    vae: AutoencoderKL, frames: torch.Tensor, latents: torch.Tensor
) -> None:
    from_double = encode_frames(vae, frames.double(), chunk_size=F)

    torch.testing.assert_close(from_double, latents, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("shape", "chunk_size", "message"),
    [
        ((F, 4, H, W), 1, "shape"),
        ((0, 3, H, W), 1, "shape"),
        ((3, H, W), 1, "shape"),
        ((F, 3, 60, W), 1, "multiples of 8"),
        ((F, 3, H, W), 0, "chunk_size"),
    ],
)
def test_encode_rejects_bad_input(
    vae: AutoencoderKL, shape: tuple[int, ...], chunk_size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        encode_frames(vae, torch.zeros(shape), chunk_size=chunk_size)


def test_decode_rejects_latents_with_the_wrong_channel_count(vae: AutoencoderKL) -> None:
    with pytest.raises(ValueError, match=r"\(F>0, 4, H, W\)"):
        decode_latents(vae, torch.zeros(2, 3, 8, 8), chunk_size=1)


# Stable Video Diffusion's VAE: an image encoder, and a decoder that mixes the frames of a clip.


@pytest.fixture(scope="module")
def svd_vae(tmp_path_factory: pytest.TempPathFactory) -> AutoencoderKLTemporalDecoder:
    bundle = build_tiny_svd(tmp_path_factory.mktemp("tiny") / "svd", seed=0)
    return AutoencoderKLTemporalDecoder.from_pretrained(bundle, subfolder="vae").eval()


@pytest.fixture(scope="module")
def svd_frames() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 64, 96, generator=generator) * 2 - 1


@pytest.fixture(scope="module")
def svd_latents(svd_vae: AutoencoderKLTemporalDecoder, svd_frames: torch.Tensor) -> torch.Tensor:
    return encode_frames(svd_vae, svd_frames, chunk_size=4)


def direct_decode(vae: AutoencoderKLTemporalDecoder, latents: torch.Tensor, num_frames: int) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(latents / 0.18215, num_frames=num_frames).sample.clamp(-1, 1)


def test_temporal_vae_encodes_frame_by_frame_to_the_scaled_mode(
    svd_vae: AutoencoderKLTemporalDecoder, svd_frames: torch.Tensor, svd_latents: torch.Tensor
) -> None:
    with torch.no_grad():
        mode = svd_vae.encode(svd_frames).latent_dist.mode()

    assert downscale_factor(svd_vae) == 8
    assert svd_latents.shape == (4, 4, 8, 12)
    torch.testing.assert_close(svd_latents, mode * 0.18215, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(encode_frames(svd_vae, svd_frames, chunk_size=1), svd_latents, atol=1e-5, rtol=0)


def test_temporal_decoding_of_one_chunk_is_one_clip(
    svd_vae: AutoencoderKLTemporalDecoder, svd_latents: torch.Tensor
) -> None:
    decoded = decode_latents(svd_vae, svd_latents, chunk_size=4)

    assert decoded.shape == (4, 3, 64, 96)
    torch.testing.assert_close(decoded, direct_decode(svd_vae, svd_latents, 4), atol=1e-5, rtol=0)


def test_temporal_decoding_in_pairs_decodes_each_pair_as_a_clip(
    svd_vae: AutoencoderKLTemporalDecoder, svd_latents: torch.Tensor
) -> None:
    pairs = torch.cat([direct_decode(svd_vae, svd_latents[i : i + 2], 2) for i in (0, 2)])

    decoded = decode_latents(svd_vae, svd_latents, chunk_size=2)

    torch.testing.assert_close(decoded, pairs, atol=1e-5, rtol=0)


def test_temporal_decoding_depends_on_the_chunk_size(
    svd_vae: AutoencoderKLTemporalDecoder, svd_latents: torch.Tensor
) -> None:
    # The identities above could not fail if frames were decoded alone (num_frames=1) every time.
    whole = decode_latents(svd_vae, svd_latents, chunk_size=4)
    alone = direct_decode(svd_vae, svd_latents, 1)

    assert not torch.allclose(decode_latents(svd_vae, svd_latents, chunk_size=2), whole, atol=1e-3)
    assert not torch.allclose(alone, whole, atol=1e-3)
    torch.testing.assert_close(decode_latents(svd_vae, svd_latents, chunk_size=1), alone, atol=1e-5, rtol=0)
