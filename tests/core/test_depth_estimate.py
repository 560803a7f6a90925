"""The backend-neutral depth predictor and the normalisation of depth over a clip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DPTImageProcessor
from transformers.models.dpt.image_processing_dpt import get_resize_output_image_size

from reelflow.core.depth.estimate import Preprocessing, depth_predictor, depth_range, normalise_depth
from reelflow.core.tiny import is_tiny_bundle
from reelflow.core.tiny_depth import build_tiny_depth_anything, build_tiny_dpt, tiny_depth_anything
from reelflow.schemas.errors import ModelError


class Reads:
    """An array that records how many frames each read takes."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.reads = data, data.shape, []

    def __getitem__(self, index: slice) -> np.ndarray:
        self.reads.append(len(range(*index.indices(self.shape[0]))))
        return self.data[index]


@pytest.fixture
def raw() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((7, 5, 6)) * 3 + rng.random((7, 1, 1)) * 10).astype(np.float32)  # each frame its own shift


@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_per_video_normalisation_is_one_affine_map_for_the_clip(raw: np.ndarray, chunk_size: int) -> None:
    source, out = Reads(raw), np.zeros_like(raw)
    assert normalise_depth(source, out, mode="video", chunk_size=chunk_size) == (float(raw.min()), float(raw.max()))
    np.testing.assert_allclose(out, (raw - raw.min()) / (raw.max() - raw.min()), rtol=0, atol=1e-6)
    assert max(source.reads) <= chunk_size and sum(source.reads) == 2 * len(raw)  # two passes, chunk by chunk


def test_per_frame_normalisation_maps_each_frame_on_its_own(raw: np.ndarray) -> None:
    out = np.zeros_like(raw)
    normalise_depth(raw, out, mode="frame", chunk_size=3)
    lows, highs = raw.min(axis=(1, 2), keepdims=True), raw.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out, (raw - lows) / (highs - lows), rtol=0, atol=1e-6)
    shifted = raw.copy()
    shifted[2] += 5.0  # a per-image shift vanishes per frame ...
    again = np.zeros_like(raw)
    normalise_depth(shifted, again, mode="frame")
    np.testing.assert_allclose(again, out, rtol=0, atol=1e-6)
    normalise_depth(shifted, again, mode="video")  # ... and moves every frame per video (the range moved)
    assert not np.allclose(again[0], (raw[0] - raw.min()) / (raw.max() - raw.min()), atol=1e-3)


def test_constant_depth_maps_to_zero() -> None:
    flat = np.full((3, 4, 4), 2.5, np.float32)
    out = np.ones_like(flat)
    assert normalise_depth(flat, out, mode="video") == (2.5, 2.5)
    np.testing.assert_array_equal(out, 0.0)
    out[:] = 1.0
    normalise_depth(flat, out, mode="frame")
    np.testing.assert_array_equal(out, 0.0)
    assert depth_range(np.arange(24, dtype=np.float32).reshape(6, 2, 2), chunk_size=4) == (0.0, 23.0)


@pytest.mark.parametrize(("keep_aspect_ratio", "multiple"), [(False, 1), (True, 14), (True, 32)])
def test_input_sizes_follow_transformers_dpt_rule(keep_aspect_ratio: bool, multiple: int) -> None:
    rule = Preprocessing((518, 518), keep_aspect_ratio, multiple, (0.5,) * 3, (0.5,) * 3)
    for height, width in [(64, 96), (480, 854), (1080, 1920), (720, 540), (518, 518), (100, 700)]:
        expected = get_resize_output_image_size(torch.zeros(3, height, width), (518, 518), keep_aspect_ratio, multiple)
        assert rule.input_size(height, width) == (expected.height, expected.width)


@pytest.mark.parametrize("size", [(64, 96), (56, 56), (121, 77)])
def test_pixels_are_the_image_processors_own(size: tuple[int, int]) -> None:
    """Batched torch resizing gives what DPTImageProcessor gives image by image (Depth Anything's settings)."""
    processor = DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])  # fmt: skip
    predictor = depth_predictor(tiny_depth_anything(), processor)
    frames = np.random.default_rng(1).integers(0, 256, (3, *size, 3), dtype=np.uint8)
    expected = processor(images=list(frames), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(predictor.preprocessing(torch.from_numpy(frames)), expected, atol=1e-6, rtol=0)


def test_a_metric_depth_model_gives_inverse_depth() -> None:
    processor = DPTImageProcessor(size={"height": 56, "width": 56})
    model = tiny_depth_anything()
    frames = np.random.default_rng(2).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    relative = depth_predictor(model, processor)(frames)
    model.config.depth_estimation_type = "metric"
    np.testing.assert_allclose(depth_predictor(model, processor)(frames), 1.0 / relative, rtol=1e-5)


def test_models_without_a_depth_backend_are_refused() -> None:
    with pytest.raises(ModelError, match="no depth backend for a torch.nn.modules.linear.Linear"):
        depth_predictor(torch.nn.Linear(2, 2))
    with pytest.raises(ModelError, match="needs its image processor"):
        depth_predictor(tiny_depth_anything())


@pytest.mark.parametrize("builder", [build_tiny_dpt, build_tiny_depth_anything])
def test_tiny_depth_models_are_a_pure_function_of_the_seed(builder, tmp_path: Path) -> None:
    first, again, other = builder(tmp_path / "a"), builder(tmp_path / "b"), builder(tmp_path / "c", seed=1)
    files = sorted(p.name for p in first.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert is_tiny_bundle(first)
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


@pytest.mark.parametrize(("setting", "said"), [({"do_pad": True}, "do_pad is on"), ({"resample": 2}, "resample is 2"),
                                               ({"rescale_factor": 1 / 127.5}, "rescale_factor is")])
def test_processor_settings_the_preprocessing_does_not_reproduce_are_refused(setting: dict, said: str) -> None:
    from transformers import DPTImageProcessor

    from reelflow.core.depth.estimate import _check_processor
    from reelflow.schemas.errors import ModelError

    _check_processor(DPTImageProcessor())
    with pytest.raises(ModelError, match=said):
        _check_processor(DPTImageProcessor(**setting))
