"""Wan's 3D VAE stages end to end on the tiny Wan bundle: 4k+1 frames by policy, the clip's frames back, and the
guards that refuse before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from reelflow.core.frames import from_model_range, to_model_range
from reelflow.core.wan import normalise
from reelflow.deployments import spec_path
from reelflow.flows.edit import edit_video, prepare_run
from reelflow.schemas.errors import SpecError
from reelflow.schemas.loading import load_spec
from reelflow.schemas.settings import Settings
from reelflow.storage.store import ArtifactStore

pytestmark = pytest.mark.flow


def reconstruct(model: Path, clip: Path, tmp_path: Path, *overrides: str):
    given = [f"models.wan.id={model}", f"input={clip}", f"store={tmp_path / 'store'}", f"output={tmp_path / 'out'}",
             "stages.decode_video.params.num_frames=6", "stages.decode_video.params.width=64",
             "stages.decode_video.params.height=48", "stages.encode_video.params.preset=ultrafast"]  # fmt: skip
    return load_spec(spec_path("reconstruct-wan"), [*given, *overrides])


def test_a_clip_is_padded_to_4k_plus_1_for_the_vae_and_decoded_back_to_its_own_frames(tiny_wan: Path, clip: Path,
                                                                                        tmp_path: Path) -> None:  # fmt: skip
    manifest = edit_video(reconstruct(tiny_wan, clip, tmp_path))
    assert manifest.status == "completed"
    stages = {r.name: r for r in manifest.stages}
    store = ArtifactStore(manifest.store)
    source = np.asarray(store.open("decode_video", stages["decode_video"].key)["frames"][:])
    encoded = store.open("encode_latents", stages["encode_latents"].key)
    assert encoded["latents"].shape == (1, 3, 16, 6, 8) and encoded["latents"].metadata.dimension_names[:2] == ("window", "latent_frame")
    assert (encoded.attrs["frames"], encoded.attrs["padded"], encoded.attrs["latent_frames"]) == (6, 3, 3)
    # The stored latents are the VAE's own (the posterior's mode), normalised by its per-channel statistics.
    vae = AutoencoderKLWan.from_pretrained(tiny_wan, subfolder="vae")
    padded = np.concatenate([source, np.repeat(source[-1:], 3, axis=0)])
    with torch.no_grad():
        expected = vae.encode(to_model_range(padded).permute(1, 0, 2, 3)[None]).latent_dist.mode()
    np.testing.assert_allclose(encoded["latents"][:], normalise(expected, vae.config)[0].transpose(0, 1).numpy()[None],
                               atol=1e-4)  # fmt: skip
    decoded = store.open("decode_latents", stages["decode_latents"].key)["frames"]
    assert decoded.shape == source.shape, "the padding is dropped again: the clip keeps its frame count"
    with torch.no_grad():
        video = vae.decode(expected).sample[0].transpose(0, 1)[:6]  # the first 6 of 9 decoded frames: the clip's own
    # Equal but for rounding: the stored latents went through the VAE's normalisation and back (a level at most).
    np.testing.assert_allclose(decoded[:].astype(int), from_model_range(video).astype(int), atol=1)
    # A clip that already has 4k+1 frames passes the strict policy unpadded.
    exact = edit_video(reconstruct(tiny_wan, clip, tmp_path, "stages.decode_video.params.num_frames=5",
                                   "stages.encode_latents.params.frame_policy=refuse"))  # fmt: skip
    stages = {r.name: r for r in exact.stages}
    assert store.open("encode_latents", stages["encode_latents"].key).attrs["padded"] == 0
    # Windows of 5 frames: each encoded on its own (no padding), decoded and cross-faded back to the clip's 6 frames.
    windowed = edit_video(reconstruct(tiny_wan, clip, tmp_path, "stages.encode_latents.params.window=5"))
    stages = {r.name: r for r in windowed.stages}
    encoded = store.open("encode_latents", stages["encode_latents"].key)
    assert encoded["latents"].shape == (2, 2, 16, 6, 8) and encoded.attrs["windows"]["spans"] == [[0, 5], [1, 6]]
    with torch.no_grad():
        second = vae.encode(to_model_range(source[1:6]).permute(1, 0, 2, 3)[None]).latent_dist.mode()
    np.testing.assert_allclose(encoded["latents"][1], normalise(second, vae.config)[0].transpose(0, 1).numpy(), atol=1e-4)
    assert store.open("decode_latents", stages["decode_latents"].key)["frames"].shape == source.shape


def test_frames_wan_cannot_take_are_refused_before_any_model_loads(tiny_wan: Path, clip: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="are 72x48; Wan needs multiples of 16.*width 72: use 64 or 80"):
        prepare_run(reconstruct(tiny_wan, clip, tmp_path, "stages.decode_video.params.width=72",
                                "stages.decode_video.params.multiple=8"), Settings())  # fmt: skip
    with pytest.raises(SpecError, match="6 frames; Wan takes 4k\\+1 frames \\(5 or 9\\): decode 5 or 9 frames"):
        prepare_run(reconstruct(tiny_wan, clip, tmp_path, "stages.encode_latents.params.frame_policy=refuse"), Settings())


def test_a_vae_that_is_not_wan_2_1s_is_refused_before_it_loads(tiny_bundle: Path, tiny_wan: Path, clip: Path,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(SpecError, match="the vae role needs Wan's AutoencoderKLWan.*this model's vae is a AutoencoderKL"):
        prepare_run(reconstruct(tiny_bundle, clip, tmp_path), Settings())
    wider = Path(shutil.copytree(tiny_wan, tmp_path / "wan-2.2-5b"))  # Wan 2.2 TI2V-5B's VAE: 48 channels, 16x
    config = json.loads((wider / "vae" / "config.json").read_text())
    (wider / "vae" / "config.json").write_text(json.dumps({**config, "z_dim": 48, "scale_factor_spatial": 16, "patch_size": 2}))
    with pytest.raises(SpecError, match="has 48 channels, 16x in space and patch size 2.*use one of those bundles"):
        prepare_run(reconstruct(wider, clip, tmp_path), Settings())


def test_spatial_tiles_are_set_for_the_stage_and_put_back_after(tiny_wan: Path) -> None:
    from reelflow.tasks.wan import _tiled

    vae = AutoencoderKLWan.from_pretrained(tiny_wan, subfolder="vae")
    with _tiled(vae, True):
        assert vae.use_tiling
    assert vae.use_tiling is False
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=16,
                      tile_sample_stride_width=16)  # fmt: skip
    clip = torch.rand(1, 3, 5, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        with _tiled(vae, False):
            whole = vae.encode(clip).latent_dist.mode()
        with _tiled(vae, True):
            tiled = vae.encode(clip).latent_dist.mode()
    assert vae.use_tiling is True and whole.shape == tiled.shape and not torch.equal(whole, tiled), "tiles took effect"
