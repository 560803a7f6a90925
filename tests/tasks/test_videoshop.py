"""Videoshop's stages on the tiny SVD bundle: what they store, the window chain, resume, and the guards."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from reelflow.core.editing.videoshop import apply_colour_map, fade_weights
from reelflow.core.frames import from_model_range
from reelflow.core.models import load_model
from reelflow.core.synthetic import write_edited_first_frame
from reelflow.core.tiny import PoolingVae
from reelflow.core.vae import decode_latents
from reelflow.deployments import spec_path
from reelflow.flows.dag import plan_run
from reelflow.flows.edit import prepare_run
from reelflow.schemas.calls import SourceRef, StoreSpec
from reelflow.schemas.errors import SourceError, SpecError
from reelflow.schemas.loading import load_spec
from reelflow.schemas.settings import Settings
from reelflow.storage.keys import content_key
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import task_for
from reelflow.tasks import videoshop as videoshop_tasks

FRAMES = 8  # two windows of the tiny model's 4 frames and a third moved back to end at frame 8


def overrides(svd: Path, edit: Path, *extra: str) -> list[str]:
    return [f"models.svd.id={svd}", f"sources.edited_frame.path={edit}", f"stages.decode_video.params.num_frames={FRAMES}",
            "stages.decode_video.params.width=64", "stages.decode_video.params.height=64",
            "stages.decode_video.params.multiple=8", "stages.invert_latents.params.num_steps=6", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def edit(clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("edits") / "clip.edit.png"
    write_edited_first_frame(clip, path)
    return path


def plan(clip: Path, svd: Path, edit: Path, store_url: str, *extra: str, preset: str = "videoshop") -> dict:
    spec = load_spec(spec_path(preset), overrides(svd, edit, *extra))
    fs = fsspec.filesystem("file")
    sources = {"video": SourceRef(url=str(clip), key=content_key(fs, str(clip))),
               "edited_frame": SourceRef(url=str(edit), key=content_key(fs, str(edit)), kind="image")}  # fmt: skip
    planned = plan_run(spec, sources=sources, store=StoreSpec(url=store_url), run_id="run", default_dtype="float32")
    return {p.id: p for p in planned}


def run(stages: dict, *ids: str) -> dict:
    return {sid: task_for(stages[sid].call.stage).fn(call=stages[sid].call) for sid in ids or stages}


EDIT = ("decode_video", "encode_latents", "embed_content", "invert_latents", "denoise_latents")


@pytest.fixture(scope="module")
def edited(clip: Path, tiny_svd: Path, edit: Path, tmp_path_factory: pytest.TempPathFactory):
    store_url = str(tmp_path_factory.mktemp("videoshop") / "store")
    stages = plan(clip, tiny_svd, edit, store_url)
    refs = run(stages, *EDIT)
    store = ArtifactStore(store_url)
    return {sid: store.open(ref.stage, ref.key) for sid, ref in refs.items()}, stages, store_url


def test_the_stages_store_every_intermediate(edited) -> None:
    groups, _, _ = edited
    content, inversion, edit = groups["embed_content"], groups["invert_latents"], groups["denoise_latents"]
    assert content["image"].shape == (64, 64, 3) and content["image_embeds"].shape == (1, 32)
    assert content["conditioning_latents"].shape == content["latents"].shape == (4, 8, 8)
    spans = inversion.attrs["windows"]["spans"]
    assert spans == [[0, 4], [3, 7], [4, 8]]
    assert inversion["steps"].shape == (3, 4, 4, 4, 8, 8)  # 6 steps at strength 0.55: 3 inverted, plus the start
    assert inversion.attrs["sigmas"][0] == pytest.approx(max(inversion.attrs["sigmas"]))
    assert inversion["reconstruction_error"].shape == (3, 4)
    assert edit["frames"].shape == (FRAMES, 64, 64, 3) and edit["frames"].dtype == np.uint8
    assert edit["window_latents"].shape == (3, 4, 4, 8, 8) and edit["frame_stats"].shape == (FRAMES, 2, 3)
    assert set(edit.attrs["colour"]) == {"boundary_max", "boundary_mean", "within_mean", "within_max"}
    assert tuple(edit["frames"].metadata.dimension_names) == ("frame", "y", "x", "rgb")


def test_per_frame_normalisation_and_rescaling_statistics(edited) -> None:
    groups, _, _ = edited
    x0 = torch.from_numpy(np.asarray(groups["invert_latents"]["steps"][0, 0]))
    torch.testing.assert_close(x0.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(x0.std(dim=(1, 2, 3)), torch.ones(4), atol=1e-3, rtol=0)
    assert groups["invert_latents"]["norm_mean"].shape == (3, 4, 1, 1, 1)
    first = torch.from_numpy(np.asarray(groups["denoise_latents"]["window_latents"][0, 0]))
    target = torch.from_numpy(np.asarray(groups["embed_content"]["latents"]))
    torch.testing.assert_close(first.mean(dim=(1, 2)), target.mean(dim=(1, 2)), atol=1e-4, rtol=0)
    torch.testing.assert_close(first.std(dim=(1, 2)), target.std(dim=(1, 2)), atol=1e-4, rtol=1e-4)


def test_each_window_is_conditioned_on_the_previous_windows_edited_frame(
    clip: Path, tiny_svd: Path, edit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stages = plan(clip, tiny_svd, edit, str(tmp_path / "store"))
    run(stages, *EDIT[:-1])
    seen: list[np.ndarray] = []
    original = videoshop_tasks.condition_on_image
    monkeypatch.setattr(videoshop_tasks, "condition_on_image", lambda image, **kw: seen.append(image) or original(image, **kw))
    ref = run(stages, "denoise_latents")["denoise_latents"]
    edited = ArtifactStore(str(tmp_path / "store")).open(ref.stage, ref.key)
    latents, colour = np.asarray(edited["window_latents"]), np.asarray(edited["colour_maps"])
    vae = load_model(str(tiny_svd), family="diffusers", component="vae")
    spans = [(0, 4), (3, 7), (4, 8)]
    assert len(seen) == 2  # window 0 is conditioned on the user's edited frame, embedded by embed_content
    for index, image in zip((1, 2), seen):
        previous = from_model_range(decode_latents(vae, torch.from_numpy(latents[index - 1]), chunk_size=4))
        head = spans[index - 2][1] - spans[index - 1][0] if index > 1 else 0
        previous = apply_colour_map(previous, colour[index - 1], fade_weights(4, head, spans[index - 1][1] - spans[index][0]))
        shared = spans[index][0] - spans[index - 1][0]  # this window's first frame, in the previous window
        np.testing.assert_array_equal(image, previous[shared])
        np.testing.assert_array_equal(edited["condition_frames"][index], image)


@pytest.mark.parametrize("colour", ["first_frame", "none"])
def test_window_colour_options(clip: Path, tiny_svd: Path, edit: Path, edited, tmp_path: Path, colour: str) -> None:
    _, _, store_url = edited
    stages = plan(clip, tiny_svd, edit, store_url, f"stages.denoise_latents.params.window_colour={colour}")
    ref = run(stages, "denoise_latents")["denoise_latents"]
    group = ArtifactStore(store_url).open(ref.stage, ref.key)
    identity = np.array([[1.0] * 3, [0.0] * 3], np.float32)
    assert all(np.array_equal(m, identity) for m in group["colour_maps"][:])  # no pixel-space map
    target = torch.from_numpy(np.asarray(edited[0]["embed_content"]["latents"]))
    for index, window in enumerate(group["window_latents"][:]):
        first = torch.from_numpy(np.asarray(window[0]))
        matches = torch.allclose(first.mean(dim=(1, 2)), target.mean(dim=(1, 2)), atol=1e-4)
        assert matches == (colour == "first_frame" or index == 0)  # "none": each window's own conditioning frame


def test_a_kill_between_windows_computes_only_the_missing_windows(
    clip: Path, tiny_svd: Path, edit: Path, edited, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_url = str(tmp_path / "store")
    stages = plan(clip, tiny_svd, edit, store_url)
    run(stages, *EDIT[:-1])
    calls: list[int] = []
    original = videoshop_tasks._WindowEdit.__call__

    def crash_on_the_last(self, window, previous):
        calls.append(window.index)
        if window.index == 2 and calls.count(2) == 1:
            raise KeyboardInterrupt("killed")  # not retried, as a SIGKILL would not be
        return original(self, window, previous)

    monkeypatch.setattr(videoshop_tasks._WindowEdit, "__call__", crash_on_the_last)
    with pytest.raises(KeyboardInterrupt):
        run(stages, "denoise_latents")
    ref = run(stages, "denoise_latents")["denoise_latents"]
    assert calls == [0, 1, 2, 2]
    group = ArtifactStore(store_url).open(ref.stage, ref.key)
    assert group.attrs["windows"]["computed"] == [2]
    assert sorted(group.attrs["provenance"]["resumed_parts"]) == ["window-0", "window-1"]
    np.testing.assert_array_equal(group["frames"][:], edited[0]["denoise_latents"]["frames"][:])


def test_a_killed_inversion_resumes_from_its_last_step(
    clip: Path, tiny_svd: Path, edit: Path, edited, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_url = str(tmp_path / "store")
    stages = plan(clip, tiny_svd, edit, store_url)
    run(stages, "decode_video", "encode_latents")
    steps: list[tuple[int, int]] = []
    original = videoshop_tasks.invert

    def killed_in_window_one(*args, on_step, resume=None, **kwargs):
        def step(i, sigma, x):
            on_step(i, sigma, x)
            steps.append((len(steps), i))
            if len(steps) == 4:  # window 0's three steps and the first of window 1
                raise KeyboardInterrupt("killed")

        return original(*args, on_step=step, resume=resume, **kwargs)

    monkeypatch.setattr(videoshop_tasks, "invert", killed_in_window_one)
    with pytest.raises(KeyboardInterrupt):
        run(stages, "invert_latents")
    ref = run(stages, "invert_latents")["invert_latents"]
    assert [i for _, i in steps] == [0, 1, 2, 0, 1, 2, 0, 1, 2]  # window 1 resumed at its second step
    group = ArtifactStore(store_url).open(ref.stage, ref.key)
    assert "window-1-step-0" in group.attrs["provenance"]["resumed_parts"]
    np.testing.assert_array_equal(group["steps"][:], edited[0]["invert_latents"]["steps"][:])


def test_the_naive_preset_is_the_ablation(clip: Path, tiny_svd: Path, edit: Path, edited) -> None:
    _, stages, _ = edited
    naive = plan(clip, tiny_svd, edit, "unused", preset="videoshop-naive")
    assert naive["invert_latents"].call.stage.params.naive and not stages["invert_latents"].call.stage.params.naive
    assert naive["invert_latents"].key != stages["invert_latents"].key
    assert naive["embed_content"].key == stages["embed_content"].key  # the edited frame's embedding is shared


# guards: before any model loads ----------------------------------------------------------------


def prepare(clip: Path, svd: Path, edit: Path, tmp_path: Path, *extra: str):
    spec = load_spec(spec_path("videoshop"), [*overrides(svd, edit, *extra), f"input={clip}", f"store={tmp_path / 'store'}"])
    return prepare_run(spec, Settings())


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from reelflow.core.models import FAMILIES

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the guards ran")

    monkeypatch.setattr(FAMILIES["diffusers"], "load", refuse)


def test_a_clip_shorter_than_the_model_needs_is_refused(clip, tiny_svd, edit, tmp_path, no_model_loads) -> None:
    with pytest.raises(SpecError, match=r"stage 'invert_latents' \(invert_latents:videoshop\): the clip gives 3 frames "
                                        r"but the model works on 4 at a time"):  # fmt: skip
        prepare(clip, tiny_svd, edit, tmp_path, "stages.decode_video.params.num_frames=3")


def test_an_overlap_that_leaves_a_window_short_is_refused(clip, tiny_svd, edit, tmp_path, no_model_loads) -> None:
    with pytest.raises(SpecError, match="windows of 4 frames overlapping by 2 cannot cover 7 frames with full windows"):
        prepare(clip, tiny_svd, edit, tmp_path, "stages.decode_video.params.num_frames=7",
                "stages.invert_latents.params.overlap=2")  # fmt: skip


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_a_scheduler_spacing_that_zeroes_the_start_is_refused(clip, tiny_svd, edit, tmp_path, spacing, no_model_loads) -> None:
    svd = tmp_path / "svd"
    shutil.copytree(tiny_svd, svd)
    config_path = svd / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "timestep_spacing": spacing}))
    with pytest.raises(SpecError, match=f"timestep_spacing '{spacing}' gives the inverse pass an init_noise_sigma of 0"):
        prepare(clip, svd, edit, tmp_path)


def test_a_missing_edited_frame_is_refused(clip, tiny_svd, tmp_path, no_model_loads) -> None:
    with pytest.raises(SourceError, match=r"image source 'edited_frame' .*missing.png' does not exist; check the path, "
                                          r"or pass --source edited_frame=PATH"):  # fmt: skip
        prepare(clip, tiny_svd, tmp_path / "missing.png", tmp_path)


def test_an_edited_frame_of_another_aspect_is_resized_like_the_video_and_said(
    clip, tiny_svd, edit, tmp_path, caplog, no_model_loads
) -> None:
    square = tmp_path / "square.png"
    Image.open(edit).resize((80, 80)).save(square)
    same = tmp_path / "double.png"
    Image.open(edit).resize((192, 128)).save(same)
    with caplog.at_level(logging.INFO, logger="reelflow.preflight"):
        prepare(clip, tiny_svd, square, tmp_path)
        prepare(clip, tiny_svd, same, tmp_path)
    said = {r.levelno: r.getMessage() for r in caplog.records if "embed_content" in r.getMessage()}
    assert "the image is 80x80 and the video 96x64" in said[logging.WARNING] and "aspect ratio differs" in said[logging.WARNING]
    assert "the image is 192x128 and the video 96x64; it is resized like the video's frames (crop to 64x64)" in said[logging.INFO]


# colour continuity across windows -------------------------------------------------------------


def test_each_window_joins_the_previous_one_at_the_frames_they_share(
    clip: Path, tiny_svd: Path, edit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a VAE that round-trips (core.tiny.PoolingVae), so colours follow the latents, every window's
    colour map brings its shared frames' per-channel mean and std to those of the previous window's
    output on them, and each window's map fades out by the frames the next window matches."""
    with_pooling_vae(monkeypatch)
    stages = plan(clip, tiny_svd, edit, str(tmp_path / "store"), "stages.decode_video.params.num_frames=16")
    refs = run(stages, *EDIT)
    group = ArtifactStore(str(tmp_path / "store")).open("denoise_latents", refs["denoise_latents"].key)
    mismatch = np.asarray(group["boundary_mismatch"][1:])
    assert group["condition_frames"].shape[0] == 5 and mismatch[:, 0].max() > 1.0  # windows disagreed
    # and were joined, up to the pixels the map pushes past 0 or 255 (the tiny UNet saturates colours)
    joined = mismatch[mismatch[:, 0] > 1.0]
    assert (mismatch[:, 1] <= mismatch[:, 0]).all() and (joined[:, 1] < 0.6 * joined[:, 0]).all()
    latents = np.asarray(group["window_latents"])
    raw_last = from_model_range(decode_latents(PoolingVae(), torch.from_numpy(latents[-2]), chunk_size=4))
    spans = [(0, 4), (3, 7), (6, 10), (9, 13), (12, 16)]
    tail = spans[-2][1] - spans[-1][0]
    mapped = apply_colour_map(raw_last, group["colour_maps"][-2], fade_weights(4, 1, tail))
    np.testing.assert_array_equal(mapped[-tail:], raw_last[-tail:])  # the next window matched the raw colours


def with_pooling_vae(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage's ``vae`` role filled by core.tiny.PoolingVae."""
    from reelflow.tasks import runtime

    original = runtime.load_role
    monkeypatch.setattr(runtime, "load_role", lambda model, role, component, *args, **kwargs: PoolingVae()
                        if role == "vae" and component is None else original(model, role, component, *args, **kwargs))  # fmt: skip
