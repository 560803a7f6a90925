"""embed_audio through the stage seam: the clip's own track or a sound file, one window per frame on the video's
clock, the sound reaching the embeddings, and a clip with no sound refused before any model loads."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from reelflow.core.synthetic import write_synthetic_clip
from reelflow.core.tiny_audio import build_tiny_pe_av, build_tiny_soundclip_swin
from reelflow.core.video import decode_frames, encode_mp4
from reelflow.flows.dag import plan_run
from reelflow.flows.edit import prepare_run
from reelflow.flows.sources import hash_sources, source_urls
from reelflow.schemas.calls import StoreSpec
from reelflow.schemas.errors import SpecError
from reelflow.schemas.loading import load_spec
from reelflow.schemas.settings import Settings
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import task_for

FPS = 24


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_soundclip_swin(tmp_path_factory.mktemp("audio") / "swin")


def write_wav(path: Path, samples: np.ndarray, rate: int = 22_050) -> Path:
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((samples * 32767).astype(np.int16)[None], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in (*stream.encode(frame), *stream.encode(None)):
            container.mux(packet)
    return path


def audio_spec(clip: Path, encoder: Path, sound: Path | None = None, **params):
    raw = {"name": "audio", "input": str(clip), "models": {"enc": {"id": str(encoder)}},
           "stages": [{"stage": "decode_video", "params": {"width": 64, "height": 48}},
                      {"stage": "embed_audio", "params": params}]}  # fmt: skip
    if sound is not None:
        raw["sources"] = {"audio": {"kind": "audio", "path": str(sound)}}
    return load_spec(raw)


def run(spec, store: str):  # noqa: ANN201
    sources = hash_sources(spec, source_urls(spec), Settings())
    planned = plan_run(spec, sources=sources, store=StoreSpec(url=store), run_id="r", default_dtype="float32")
    refs = {p.id: task_for(p.call.stage).fn(call=p.call) for p in planned}
    return ArtifactStore(store).open("embed_audio", refs["embed_audio"].key)


def test_the_clips_own_track_gives_one_embedding_per_frame_over_its_time(clip: Path, encoder: Path, tmp_path: Path) -> None:
    embedded = run(audio_spec(clip, encoder, window_seconds=0.25), str(tmp_path / "store"))
    assert embedded["embeddings"].shape == (FPS, 512) and embedded.attrs["sound"] == "video"
    times, span = embedded["frame_time"][:], embedded["span"][:]
    np.testing.assert_allclose(times, np.arange(FPS) / FPS)
    half_column = 512 / 44_100 / 2
    assert (span[:, 0] <= times + half_column).all() and (span[:, 1] >= times + 1 / FPS - half_column).all()
    assert embedded["spectrogram"].shape[0] == 128 and embedded.attrs["backend"] == "soundclip:swin_tiny"


def test_a_sound_file_on_the_videos_clock_reaches_the_embeddings(clip: Path, encoder: Path, tmp_path: Path) -> None:
    rate = 22_050
    t = np.arange(rate) / rate
    sound = np.where(t < 0.5, 0.0, 0.5 * np.sin(2 * np.pi * 880 * t)).astype(np.float32)  # silent, then a tone
    wav = write_wav(tmp_path / "sound.wav", sound, rate)
    embedded = run(audio_spec(clip, encoder, wav, window_seconds=0.1), str(tmp_path / "store"))
    vectors = embedded["embeddings"][:]
    assert embedded.attrs["sound"] == "source"
    np.testing.assert_allclose(vectors[3], vectors[4], rtol=1e-5, atol=1e-6)  # both windows wholly silent
    assert not np.allclose(vectors[3], vectors[20], atol=1e-3)  # silence and tone embed differently
    shifted = run(audio_spec(clip, encoder, wav, window_seconds=0.1, offset=0.5), str(tmp_path / "store"))
    column = 512 / 44_100
    np.testing.assert_allclose(shifted["span"][20], embedded["span"][20], atol=column)  # spans stay on the video's clock
    assert (shifted["span"][:, 0] >= 0.5 - 1e-9).all()  # ...and start where the sound does, half a second in
    np.testing.assert_allclose(shifted["embeddings"][20], vectors[3], rtol=1e-5, atol=1e-6)  # its silent part, 0.5 s later


def test_a_clip_without_sound_and_no_sound_file_is_refused_before_any_model_loads(encoder: Path, clip: Path, tmp_path: Path) -> None:
    silent = tmp_path / "silent.mp4"
    with open(clip, "rb") as handle:
        frames = decode_frames(handle, list(range(6)))
    encode_mp4(silent, frames, Fraction(FPS))
    spec = load_spec(audio_spec(silent, encoder).model_dump(mode="json"), [f"store={tmp_path / 's'}"])
    with pytest.raises(SpecError, match="the clip has no sound track and the pipeline gives no sound file: declare an `audio`"):
        prepare_run(spec, Settings())


@pytest.fixture(scope="module")
def pe_av(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pe_av(tmp_path_factory.mktemp("audio") / "pe-av")


def test_a_perception_encoder_embeds_each_frames_window_as_its_own_get_audio_embeds(clip: Path, pe_av: Path, tmp_path: Path) -> None:
    """The transformers backend: each frame's window of the 48 kHz waveform, silence where it is off the track, through
    the model's feature extractor and get_audio_embeds, computed here without the stage."""
    import torch

    from reelflow.core.audio.spectrogram import to_mono
    from reelflow.core.models import load_model
    from reelflow.core.video import decode_audio_file

    rate = 22_050
    t = np.arange(rate) / rate
    sound = (0.4 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.05 * np.random.default_rng(3).standard_normal(rate)).astype(np.float32)
    wav = write_wav(tmp_path / "sweep.wav", sound, rate)
    embedded = run(audio_spec(clip, pe_av, wav, window_seconds=0.25, batch_size=5), str(tmp_path / "store"))
    assert embedded.attrs["backend"] == "transformers:PeAudioModel" and embedded.attrs["embedding_dim"] == 32
    vectors, times, span = embedded["embeddings"][:], embedded["frame_time"][:], embedded["span"][:]
    assert vectors.shape == (FPS, 32) and embedded["spectrogram"].shape[0] == 128  # the log-mel picture is still there
    half_sample = 0.5 / 48_000
    assert (span[:, 0] <= times + half_sample).all() and (span[:, 1] >= times + 1 / FPS - half_sample).all()
    with open(wav, "rb") as handle:
        track = decode_audio_file(handle)
    waveform = to_mono(track.samples, track.sample_rate, 48_000)
    model = load_model(str(pe_av), family="transformers")
    extractor = load_model(str(pe_av), family="transformers", component="feature_extractor")
    for i in (0, 11, FPS - 1):  # cut at the start, whole, cut at the end
        first = int(np.rint((i + 0.5) / FPS * 48_000)) - 6_000
        window = np.zeros(12_000, np.float32)
        piece = waveform[max(first, 0) : first + 12_000]
        window[max(-first, 0) : max(-first, 0) + len(piece)] = piece
        inputs = extractor(window, sampling_rate=48_000, return_tensors="pt")
        with torch.no_grad():
            theirs = model.audio_model.get_audio_embeds(inputs["input_values"], inputs["padding_mask"])
        np.testing.assert_allclose(vectors[i], theirs[0].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(vectors[0], vectors[11], atol=1e-3)  # the windows differ, and so do their embeddings


def test_a_transformers_model_without_an_audio_tower_is_refused_before_any_model_loads(clip: Path, tmp_path: Path) -> None:
    from reelflow.core.tiny_audio import build_tiny_clip_512

    spec = audio_spec(clip, build_tiny_clip_512(tmp_path / "clip"))
    spec = load_spec(spec.model_dump(mode="json"), [f"store={tmp_path / 's'}"])
    with pytest.raises(SpecError, match="transformers model of type 'clip', which has no Perception Encoder audio tower"):
        prepare_run(spec, Settings())
