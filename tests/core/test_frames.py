"""Resize planning and application, and the uint8 <-> model range mapping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from reelflow.core.frames import ResizePlan, from_model_range, plan_resize, resize_frames, to_model_range


# --- plan_resize ---------------------------------------------------------------------------


def test_both_sides_crop_covers_then_centres() -> None:
    plan = plan_resize(96, 64, width=64, height=64, fit="crop", multiple=8)
    assert plan == ResizePlan(scaled_w=96, scaled_h=64, out_w=64, out_h=64, offset_x=16, offset_y=0)


def test_both_sides_pad_fits_then_centres() -> None:
    plan = plan_resize(96, 64, width=64, height=64, fit="pad", multiple=8)
    assert plan == ResizePlan(scaled_w=64, scaled_h=43, out_w=64, out_h=64, offset_x=0, offset_y=10)


def test_width_only_rounds_height_down_for_crop_and_up_for_pad() -> None:
    crop = plan_resize(1000, 700, width=256, height=None, fit="crop", multiple=8)
    pad = plan_resize(1000, 700, width=256, height=None, fit="pad", multiple=8)
    # 700 * 256 / 1000 = 179.2
    assert crop == ResizePlan(256, 179, 256, 176, 0, 1)
    assert pad == ResizePlan(256, 179, 256, 184, 0, 2)


def test_height_only_follows_aspect_ratio() -> None:
    plan = plan_resize(1920, 1080, width=None, height=512, fit="crop", multiple=64)
    # 1920 * 512 / 1080 = 910.2 -> 896
    assert (plan.out_w, plan.out_h) == (896, 512)
    assert (plan.scaled_w, plan.scaled_h) == (910, 512)
    assert plan.offset_x == 7


def test_no_size_rounds_the_source_without_scaling() -> None:
    crop = plan_resize(100, 70, width=None, height=None, fit="crop", multiple=8)
    pad = plan_resize(100, 70, width=None, height=None, fit="pad", multiple=8)
    assert crop == ResizePlan(100, 70, 96, 64, 2, 3)
    assert pad == ResizePlan(100, 70, 104, 72, 2, 1)


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_never_zero_size(fit: str) -> None:
    for plan in (
        plan_resize(5, 3, width=None, height=None, fit=fit, multiple=8),
        plan_resize(1000, 10, width=64, height=None, fit=fit, multiple=8),
    ):
        assert plan.out_w >= 8 and plan.out_h >= 8
        assert plan.scaled_w >= 1 and plan.scaled_h >= 1


@pytest.mark.parametrize(
    ("width", "message"), [(100, "width 100 is not a multiple of 8; use 96 or 104"), (5, "use 8$")]
)
def test_invalid_multiple_names_the_nearest_valid_sizes(width: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_resize(640, 480, width=width, height=None, fit="crop", multiple=8)


@pytest.mark.parametrize(
    ("src", "size", "fit"),
    list(
        itertools.product(
            [(96, 64), (64, 96), (1920, 1080), (100, 70), (37, 211)],
            [(None, None), (64, None), (None, 64), (128, 64), (64, 128)],
            ["crop", "pad"],
        )
    ),
)
def test_plan_properties(src: tuple[int, int], size: tuple[int | None, int | None], fit: str) -> None:
    (src_w, src_h), (width, height) = src, size
    plan = plan_resize(src_w, src_h, width=width, height=height, fit=fit, multiple=8)
    assert plan.out_w % 8 == 0 and plan.out_h % 8 == 0 and plan.out_w > 0 and plan.out_h > 0
    assert width is None or plan.out_w == width
    assert height is None or plan.out_h == height
    covers = plan.scaled_w >= plan.out_w and plan.scaled_h >= plan.out_h
    fits = plan.scaled_w <= plan.out_w and plan.scaled_h <= plan.out_h
    assert covers if fit == "crop" else fits
    assert plan.offset_x == abs(plan.scaled_w - plan.out_w) // 2
    assert plan.offset_y == abs(plan.scaled_h - plan.out_h) // 2
    # Aspect ratio is kept up to rounding of the shorter scaled side.
    tolerance = 1 / min(plan.scaled_w, plan.scaled_h) + 1e-9
    assert plan.scaled_w / plan.scaled_h == pytest.approx(src_w / src_h, rel=tolerance)


# --- resize_frames -------------------------------------------------------------------------


def _random_frames(f: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (f, h, w, 3), dtype=np.uint8)


def test_resize_without_scaling_is_an_exact_crop() -> None:
    frames = _random_frames(3, 64, 96)
    plan = plan_resize(96, 64, width=64, height=64, fit="crop", multiple=8)
    np.testing.assert_array_equal(resize_frames(frames, plan), frames[:, :, 16:80])


def test_resize_without_scaling_is_an_exact_pad() -> None:
    frames = _random_frames(2, 70, 100)
    plan = plan_resize(100, 70, width=None, height=None, fit="pad", multiple=8)
    out = resize_frames(frames, plan)
    assert out.shape == (2, 72, 104, 3)
    np.testing.assert_array_equal(out[:, 1:71, 2:102], frames)
    assert not out[:, 0].any() and not out[:, 71].any() and not out[:, :, :2].any()


def test_resize_pad_borders_are_black_and_content_is_the_scaled_frame() -> None:
    frames = np.full((2, 64, 96, 3), 200, np.uint8)
    plan = plan_resize(96, 64, width=64, height=64, fit="pad", multiple=8)
    out = resize_frames(frames, plan)
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8
    assert (out[:, 10:53] == 200).all()
    assert not out[:, :10].any() and not out[:, 53:].any()


def test_downscale_antialiases() -> None:
    # Without antialiasing a 4x bilinear downscale averages 4 pixels, with it about 16 to 36:
    # the noise std shrinks by about 2 versus about 5.
    frames = _random_frames(1, 128, 128)
    out = resize_frames(frames, ResizePlan(32, 32, 32, 32, 0, 0))
    assert out.std() < frames.std() / 3
    assert abs(float(out.mean()) - float(frames.mean())) < 2


def test_resize_keeps_a_gradient_monotone() -> None:
    ramp = np.broadcast_to(np.linspace(0, 255, 96).round().astype(np.uint8)[None, None, :, None], (1, 64, 96, 3))
    plan = plan_resize(96, 64, width=None, height=128, fit="crop", multiple=8)
    out = resize_frames(np.ascontiguousarray(ramp), plan)
    assert out.shape == (1, 128, 192, 3)
    row = out[0, 64, :, 0].astype(int)
    assert (np.diff(row) >= 0).all() and row[0] < 5 and row[-1] > 250


# --- model range ---------------------------------------------------------------------------


def test_model_range_round_trip_is_exact_for_every_value() -> None:
    frames = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    frames = np.concatenate([frames, frames[:, ::-1]])
    t = to_model_range(frames)
    assert t.shape == (2, 3, 16, 16) and t.dtype == torch.float32
    assert t.min() == -1.0 and t.max() == 1.0
    np.testing.assert_array_equal(from_model_range(t), frames)


def test_model_range_channel_order() -> None:
    frames = np.zeros((1, 2, 2, 3), np.uint8)
    frames[..., 0] = 255
    t = to_model_range(frames)
    assert (t[:, 0] == 1).all() and (t[:, 1:] == -1).all()


def test_from_model_range_clamps() -> None:
    t = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert from_model_range(t)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
