"""estimate_depth on the tiny depth models: what it stores, agreement with transformers' own pipeline,
per-video normalisation, batching, and frames read a batch at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr
from transformers import AutoImageProcessor, AutoModelForDepthEstimation

from reelflow.flows.dag import plan_run
from reelflow.schemas.calls import SourceRef, StoreSpec
from reelflow.schemas.loading import load_spec
from reelflow.storage.keys import content_key
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import depth as depth_tasks
from reelflow.tasks import task_for

FRAMES, WIDTH, HEIGHT = 8, 96, 64


@pytest.fixture(scope="module")
def tiny_depth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from reelflow.core.tiny_depth import build_tiny_depth_anything, build_tiny_dpt

    root = tmp_path_factory.mktemp("depth-models")
    return {"dpt": build_tiny_dpt(root / "dpt"), "depth-anything": build_tiny_depth_anything(root / "depth-anything")}


def plan(clip: Path, model: Path, store_url: str, *, frames: int = FRAMES, **params) -> dict:
    raw = {
        "name": "depth",
        "models": {"depth": {"id": str(model)}},
        "stages": [
            {"stage": "decode_video", "params": {"num_frames": frames, "width": WIDTH, "height": HEIGHT}},
            {"stage": "estimate_depth", "params": params},
        ],
    }
    fs = fsspec.filesystem("file")
    sources = {"video": SourceRef(url=str(clip), key=content_key(fs, str(clip)))}
    planned = plan_run(load_spec(raw), sources=sources, store=StoreSpec(url=store_url), run_id="run",
                       default_dtype="float32")  # fmt: skip
    return {p.id: p for p in planned}


def run(clip: Path, model: Path, store_url: str, **params) -> tuple[zarr.Group, zarr.Group]:
    """The decoded frames and the depth artifact."""
    stages = plan(clip, model, store_url, **params)
    store = ArtifactStore(store_url)
    groups = []
    for sid in ("decode_video", "estimate_depth"):
        ref = task_for(stages[sid].call.stage).fn(call=stages[sid].call)
        groups.append(store.open(ref.stage, ref.key))
    return groups[0], groups[1]


@pytest.fixture(scope="module")
def estimated(clip: Path, tiny_depth: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    store_url = str(tmp_path_factory.mktemp("depth") / "store")
    return {name: run(clip, model, store_url) for name, model in tiny_depth.items()}


@pytest.mark.parametrize("name", ["dpt", "depth-anything"])
def test_the_stage_stores_depth_raw_depth_and_timestamps(estimated: dict, name: str) -> None:
    video, depth = estimated[name]
    assert depth["depth"].shape == depth["raw_depth"].shape == (FRAMES, HEIGHT, WIDTH)
    assert depth["depth"].dtype == np.float16 and depth["raw_depth"].dtype == np.float32
    assert tuple(depth["depth"].metadata.dimension_names) == ("frame", "y", "x")
    # the synthetic clip is 24 fps: each frame at its source index over 24
    np.testing.assert_allclose(depth["timestamp"][:], np.asarray(video["frame_index"][:]) / 24, rtol=0, atol=1e-12)
    raw = np.asarray(depth["raw_depth"][:])
    attrs = depth.attrs
    assert (attrs["raw_min"], attrs["raw_max"]) == (float(raw.min()), float(raw.max())) and raw.max() > raw.min()
    assert attrs["normalisation"] == "video"
    expected = {"dpt": ("transformers:DPTForDepthEstimation", [64, 64]),
                "depth-anything": ("transformers:DepthAnythingForDepthEstimation", [56, 84])}  # fmt: skip
    assert (attrs["backend"], attrs["input_size"]) == expected[name]


@pytest.mark.parametrize("name", ["dpt", "depth-anything"])
def test_raw_depth_is_what_transformers_own_pipeline_predicts(estimated: dict, tiny_depth: dict, name: str) -> None:
    """The image processor on the decoded frames, the model, then post_process_depth_estimation to the frame size."""
    video, depth = estimated[name]
    model = AutoModelForDepthEstimation.from_pretrained(tiny_depth[name]).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_depth[name])
    frames = list(np.asarray(video["frames"][:]))
    with torch.no_grad():
        outputs = model(**processor(images=frames, return_tensors="pt"))
    expected = processor.post_process_depth_estimation(outputs, target_sizes=[(HEIGHT, WIDTH)] * FRAMES)
    expected = torch.stack([e["predicted_depth"] for e in expected]).numpy()
    spread = expected.max() - expected.min()
    np.testing.assert_allclose(depth["raw_depth"][:], expected, rtol=0, atol=1e-4 * spread)


@pytest.mark.parametrize("name", ["dpt", "depth-anything"])
def test_per_video_depth_is_the_raw_depth_over_the_clips_range(estimated: dict, name: str) -> None:
    _, depth = estimated[name]
    raw, stored = np.asarray(depth["raw_depth"][:]), np.asarray(depth["depth"][:], np.float32)
    np.testing.assert_allclose(stored, (raw - raw.min()) / (raw.max() - raw.min()), rtol=0, atol=1e-3)
    # one range for the clip: only the frames holding its extremes reach 0 and 1
    per_frame_extremes = np.stack([stored.min(axis=(1, 2)), stored.max(axis=(1, 2))], axis=1)
    assert not np.allclose(per_frame_extremes, [[0.0, 1.0]] * FRAMES, atol=1e-3)


def patch_raw_depth(monkeypatch: pytest.MonkeyPatch, low: float, high: float, frame: int, offset: float) -> None:
    """The predictor's raw depth with two pixels of frame 0 set to ``low`` and ``high`` (so frame 0 holds the
    clip's range, whatever the tiny model predicts) and ``frame`` raised by ``offset`` everywhere (a per-image
    shift, as these models' per-image scale and shift drift)."""
    original = depth_tasks.estimate

    def patched(predictor, frames, *, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        for start, chunk in original(predictor, frames, batch_size=batch_size):
            chunk = chunk.copy()
            if start == 0:
                chunk[0, 0, :2] = low, high
            if start <= frame < start + len(chunk):
                chunk[frame - start] += offset
            yield start, chunk

    monkeypatch.setattr(depth_tasks, "estimate", patched)


@pytest.mark.parametrize("normalise", ["video", "frame"])
def test_an_offset_on_one_frame_moves_that_frame_alone_and_only_per_video(
    clip: Path, tiny_depth: dict, estimated: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, normalise: str
) -> None:
    """Per video, a constant offset added to one frame's raw depth leaves every other frame's stored depth
    unchanged and shows up in that frame as the offset over the clip's range; per frame it is erased, which
    is how a per-image drift of the model becomes flicker."""
    raw = np.asarray(estimated["depth-anything"][1]["raw_depth"][:])
    spread = float(raw.max() - raw.min())
    low, high, frame, offset = float(raw.min()) - spread, float(raw.max()) + spread, 5, 0.5 * spread
    model, stored = tiny_depth["depth-anything"], {}
    for name, shift in (("clean", 0.0), ("shifted", offset)):
        patch_raw_depth(monkeypatch, low, high, frame, shift)
        _, depth = run(clip, model, str(tmp_path / name), normalise=normalise)
        stored[name] = np.asarray(depth["depth"][:], np.float32)
        assert (depth.attrs["raw_min"], depth.attrs["raw_max"]) == pytest.approx((low, high))
    others = [f for f in range(FRAMES) if f != frame]
    np.testing.assert_array_equal(stored["shifted"][others], stored["clean"][others])
    change = stored["shifted"][frame] - stored["clean"][frame]
    expected = offset / (high - low) if normalise == "video" else 0.0  # 1/6 per video
    np.testing.assert_allclose(change, expected, rtol=0, atol=2e-3)


def test_per_frame_normalisation_maps_every_frame_to_the_unit_range(
    clip: Path, tiny_depth: dict, tmp_path: Path
) -> None:
    _, depth = run(clip, tiny_depth["depth-anything"], str(tmp_path / "store"), normalise="frame")
    stored = np.asarray(depth["depth"][:], np.float32)
    np.testing.assert_allclose(stored.min(axis=(1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(stored.max(axis=(1, 2)), 1.0, atol=1e-3)
    assert depth.attrs["normalisation"] == "frame"


def spy(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """Frames per predictor call, and frames per read of a ``frames`` array."""
    batches: list[int] = []
    reads: list[int] = []
    original_load, original_getitem = depth_tasks.load_predictor, zarr.Array.__getitem__

    def load(ctx):
        predictor = original_load(ctx)
        forward = predictor.forward
        return type(predictor)(predictor.backend, predictor.preprocessing,
                               lambda pixels: batches.append(len(pixels)) or forward(pixels), predictor.device,
                               predictor.dtype)  # fmt: skip

    def getitem(self, selection):
        if self.basename == "frames" and isinstance(selection, slice):
            reads.append(len(range(*selection.indices(self.shape[0]))))
        return original_getitem(self, selection)

    monkeypatch.setattr(depth_tasks, "load_predictor", load)
    monkeypatch.setattr(zarr.Array, "__getitem__", getitem)
    return batches, reads


def test_frames_are_read_and_predicted_a_batch_at_a_time_and_batching_changes_nothing(
    clip: Path, tiny_depth: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = 10
    batches, reads = spy(monkeypatch)
    _, batched = run(clip, tiny_depth["depth-anything"], str(tmp_path / "store"), frames=frames, batch_size=4)
    assert batches == [4, 4, 2] and max(reads) <= 4 and sum(reads) >= frames
    batches.clear()
    reads.clear()
    _, single = run(clip, tiny_depth["depth-anything"], str(tmp_path / "store"), frames=frames, batch_size=1)
    assert batches == [1] * frames and max(reads) == 1
    np.testing.assert_allclose(single["raw_depth"][:], batched["raw_depth"][:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(single["depth"][:], np.float32), np.asarray(batched["depth"][:], np.float32),
                               rtol=0, atol=1e-3)  # fmt: skip


def test_an_input_size_changes_what_the_model_sees(
    clip: Path, tiny_depth: dict, estimated: dict, tmp_path: Path
) -> None:
    _, own = estimated["depth-anything"]
    _, larger = run(clip, tiny_depth["depth-anything"], str(tmp_path / "store"), input_size=112)
    assert larger.attrs["input_size"] == [70, 112] and larger["depth"].shape == own["depth"].shape
    assert not np.allclose(larger["raw_depth"][:], own["raw_depth"][:])


def test_frames_made_by_a_stage_take_the_times_of_the_frames_they_descend_from(
    clip: Path, tiny_bundle: Path, tiny_depth: dict, tmp_path: Path
) -> None:
    raw = {
        "name": "depth-of-an-edit",
        "models": {"sd": {"id": str(tiny_bundle)}, "depth": {"id": str(tiny_depth["dpt"])}},
        "stages": [
            {"stage": "decode_video", "params": {"num_frames": 4, "start": 0.25, "stride": 2, "width": 64,
                                                 "height": 64}},  # fmt: skip
            {"stage": "encode_latents", "model": "sd", "inputs": {"frames": "decode_video"}},
            {"stage": "decode_latents", "model": "sd"},
            {"stage": "estimate_depth", "model": "depth", "inputs": {"frames": "decode_latents"}},
        ],
    }
    fs = fsspec.filesystem("file")
    sources = {"video": SourceRef(url=str(clip), key=content_key(fs, str(clip)))}
    store_url = str(tmp_path / "store")
    planned = plan_run(load_spec(raw), sources=sources, store=StoreSpec(url=store_url), run_id="run",
                       default_dtype="float32")  # fmt: skip
    refs = {p.id: task_for(p.call.stage).fn(call=p.call) for p in planned}
    depth = ArtifactStore(store_url).open("estimate_depth", refs["estimate_depth"].key)
    np.testing.assert_allclose(depth["timestamp"][:], np.array([6, 8, 10, 12]) / 24, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("builder", "architecture"), [("build_tiny_midas", "dpt_large_384"),
                                                      ("build_tiny_midas_beit", "dpt_beit_large_512")])
def test_a_midas_model_runs_through_the_same_stage(clip: Path, tmp_path: Path, builder: str, architecture: str) -> None:
    from reelflow.core import tiny_depth

    model = getattr(tiny_depth, builder)(tmp_path / "midas")
    _, depth = run(clip, model, str(tmp_path / "store"))
    assert depth.attrs["backend"] == f"midas:{architecture}" and depth.attrs["input_size"] == [64, 96]
    stored = np.asarray(depth["depth"][:], np.float32)
    assert stored.shape == (FRAMES, HEIGHT, WIDTH) and stored.min() == 0.0 and stored.max() == 1.0
