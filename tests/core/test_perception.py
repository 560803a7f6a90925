"""Perception Encoder Audio-Visual as embed_audio and Soundini use it: one waveform window per frame over the frame's
own time, audio and image embeddings equal to what transformers' own PeAudioVideoModel.forward pairs in its
audio-video logits, the image side differentiable, and the width of the shared space told without loading weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reelflow.core.audio.perception import (
    audio_embeddings,
    audio_tower,
    embedding_width,
    image_embeddings,
    sample_windows,
    video_tower,
)
from reelflow.core.models import load_model
from reelflow.core.tiny_audio import PE_AV_IMAGE_SIZE, build_tiny_pe_av

RATE = 48_000


@pytest.fixture(scope="module")
def pe_av(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pe_av(tmp_path_factory.mktemp("pe") / "pe-av")


@pytest.fixture(scope="module")
def loaded(pe_av: Path):  # noqa: ANN201
    return load_model(str(pe_av), family="transformers"), load_model(str(pe_av), family="transformers", component="processor")


@pytest.mark.parametrize("fps", [24.0, 25.0, 30000 / 1001])
def test_one_window_per_frame_covering_the_frames_time(fps: float) -> None:
    count, length = 48, 3 * RATE
    starts = np.arange(count) / fps
    cut = sample_windows(starts, 1.0 / fps, 0.5, length, RATE).cut()
    spans = cut.seconds()
    assert spans.shape == (count, 2) and (np.diff(cut.start) >= 0).all()
    half_sample = 0.5 / RATE
    assert (spans[:, 0] <= starts + half_sample).all() and (spans[:, 1] >= starts + 1.0 / fps - half_sample).all()
    centres = spans.mean(axis=1)
    inside = (starts >= 0.25) & (starts + 1.0 / fps <= 2.75)  # a whole half-second window around them fits on the track
    assert ((cut.stop - cut.start)[inside] == RATE // 2).all()
    np.testing.assert_allclose(centres[inside], (starts + 0.5 / fps)[inside], atol=1.0 / RATE)
    assert (cut.stop - cut.start)[0] < RATE // 2  # the first ones are cut at the track's start


def test_each_window_is_the_sound_where_it_meets_the_track_and_silence_elsewhere() -> None:
    waveform = np.arange(1, 101, dtype=np.float32)  # 100 samples, none of them zero
    windows = sample_windows(np.array([0.0, 0.5, 0.95, 2.0]), 0.1, 0.2, len(waveform), 100)
    # 20-sample windows centred on samples 5, 55, 100 and 205.
    assert windows.first.tolist() == [-5, 45, 90, 195]
    out = windows.waveforms(waveform, range(4))
    assert out.shape == (4, 20)
    np.testing.assert_array_equal(out[0], np.r_[np.zeros(5), waveform[:15]])
    np.testing.assert_array_equal(out[1], waveform[45:65])
    np.testing.assert_array_equal(out[2], np.r_[waveform[90:], np.zeros(10)])
    assert not out[3].any()  # a window off the track is silence
    cut = windows.cut()
    assert cut.start.tolist() == [0, 45, 90, 100] and cut.stop.tolist() == [15, 65, 100, 100]


def test_audio_and_image_embeddings_are_what_pe_av_pairs_in_its_audio_video_logits(loaded) -> None:  # noqa: ANN001
    model, processor = loaded
    rng = np.random.default_rng(0)
    waves = (0.1 * rng.standard_normal((2, RATE // 2))).astype(np.float32)
    frames = torch.from_numpy(rng.integers(0, 256, (2, 3, PE_AV_IMAGE_SIZE, PE_AV_IMAGE_SIZE), dtype=np.uint8))
    audio_in = processor.feature_extractor(list(waves), sampling_rate=RATE, return_tensors="pt")
    video_in = processor.video_processor(videos=[f[None] for f in frames], return_tensors="pt")
    with torch.no_grad():
        theirs = model(input_values=audio_in["input_values"], padding_mask=audio_in["padding_mask"],
                       pixel_values_videos=video_in["pixel_values_videos"])  # fmt: skip
    ours_audio = audio_embeddings(model, processor.feature_extractor, waves, RATE)
    ours_images = image_embeddings(model, frames.float() / 255, processor).detach()
    torch.testing.assert_close(ours_audio, theirs.audio_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_images, theirs.video_embeds, rtol=1e-5, atol=1e-6)
    # PeVideoModel.forward, the one PE video method that runs in transformers 5.24, agrees too.
    with torch.no_grad():
        video_only = video_tower(model)(input_ids=torch.tensor([[0, 1, 2]]), pixel_values_videos=video_in["pixel_values_videos"])
    torch.testing.assert_close(ours_images, video_only.video_embeds, rtol=1e-5, atol=1e-6)


def test_audio_embeddings_do_not_depend_on_the_windows_batched_with_them(loaded) -> None:  # noqa: ANN001
    model, processor = loaded
    waves = (0.1 * np.random.default_rng(1).standard_normal((3, 12_000))).astype(np.float32)
    together = audio_embeddings(model, processor.feature_extractor, waves, RATE)
    alone = torch.cat([audio_embeddings(model, processor.feature_extractor, waves[i : i + 1], RATE) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together[0], together[1], atol=1e-4)  # different sounds embed differently
    with pytest.raises(ValueError, match="sampling rate"):
        audio_embeddings(model, processor.feature_extractor, waves, 44_100)


def test_image_embeddings_are_differentiable_and_resize_as_the_processor_does(loaded) -> None:  # noqa: ANN001
    model, processor = loaded
    frames = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 3, 40, 56), dtype=np.uint8))
    images = (frames.float() / 255).requires_grad_(True)
    embedded = image_embeddings(model, images, processor.video_processor)  # the video processor alone works as well
    assert embedded.shape == (2, embedding_width(model))
    embedded.square().sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    pixels = processor.video_processor(videos=[f[None] for f in frames], return_tensors="pt")["pixel_values_videos"]
    tower = video_tower(model)
    with torch.no_grad():
        by_hand = tower.video_head(tower.video_encoder(pixel_values_videos=pixels).pooler_output)
    # The processor resizes 8-bit pixels and rounds them back to 8 bits; ours resizes floats: close, not equal.
    torch.testing.assert_close(embedded.detach(), by_hand, rtol=0, atol=5e-3 * by_hand.abs().max().item())


def test_a_model_of_another_width_is_told_apart_from_its_config_alone(pe_av: Path, loaded, tmp_path: Path) -> None:  # noqa: ANN001
    model, processor = loaded
    wide = build_tiny_pe_av(tmp_path / "wide", text_width=48)
    config = json.loads((pe_av / "config.json").read_text())
    assert embedding_width(config) == embedding_width(model) == embedding_width(model.config) == 32
    assert embedding_width(json.loads((wide / "config.json").read_text())) == 48
    waves = np.zeros((1, 4800), np.float32)
    assert audio_embeddings(load_model(str(wide), family="transformers"), processor.feature_extractor, waves, RATE).shape == (1, 48)
    with pytest.raises(ValueError, match="model_type 'clip'.*pe_audio_video"):
        embedding_width({"model_type": "clip", "projection_dim": 512})
    with pytest.raises(ValueError, match="no Perception Encoder audio tower; known model types: pe_audio_video, pe_audio"):
        audio_tower(torch.nn.Linear(1, 1))
