"""Window plans: coverage, anchors, and stitching that is exact and survives a window computed twice."""

from __future__ import annotations

import numpy as np
import pytest

from reelflow.core.windows import WindowPlan, stitch_window


@pytest.mark.parametrize("num_frames", [1, 3, 4, 5, 9, 10, 17, 64])
@pytest.mark.parametrize(("length", "overlap"), [(4, 0), (4, 1), (4, 2), (8, 3)])
def test_windows_cover_every_frame_once_outside_overlaps(num_frames: int, length: int, overlap: int) -> None:
    windows = WindowPlan(length, overlap).windows(num_frames)
    assert windows[0].start == 0 and windows[-1].stop == num_frames
    for before, after in zip(windows, windows[1:]):
        assert after.start == before.stop - overlap == before.start + length - overlap
        assert before.tail == after.head == overlap
    for window in windows:
        assert window.stop - window.start <= length
        assert window.stop - window.start >= window.head + window.tail


def test_the_anchor_is_prepended_to_windows_that_lack_it() -> None:
    windows = WindowPlan(4, 1, anchor=0).windows(10)
    assert [w.frames for w in windows] == [[0, 1, 2, 3], [0, 3, 4, 5, 6], [0, 6, 7, 8, 9]]
    assert windows[1].own(np.arange(5)).tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("bad", [dict(length=4, overlap=3), dict(length=0), dict(length=4, overlap=-1)])
def test_bad_plans_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="window plan needs"):
        WindowPlan(**bad)


def test_anchor_outside_the_clip_is_refused() -> None:
    with pytest.raises(ValueError, match="anchor frame 12 is outside"):
        WindowPlan(4, 1, anchor=12).windows(10)


def stitch(plan: WindowPlan, frames: np.ndarray, op, redo: int | None = None) -> np.ndarray:
    out = np.full_like(frames, -1.0)
    tails = np.zeros((2, plan.length, *frames.shape[1:]), frames.dtype)
    for window in plan.windows(len(frames)):
        result = op(frames[window.frames])
        stitch_window(plan, window, result, out, tails)
        if window.index == redo:  # a crash after this window's writes but before it was marked done
            stitch_window(plan, window, result, out, tails)
    return out


@pytest.mark.parametrize("stitching", ["blend", "cut"])
def test_a_framewise_op_stitches_back_to_the_op_on_the_whole_clip(stitching: str) -> None:
    frames = np.random.default_rng(0).normal(size=(11, 2, 3)).astype(np.float32)
    plan = WindowPlan(4, 2, anchor=0, stitch=stitching)
    np.testing.assert_allclose(stitch(plan, frames, lambda x: 2 * x + 1), 2 * frames + 1, rtol=1e-6)


def test_overlaps_cross_fade_from_the_earlier_window_to_the_later() -> None:
    frames = np.zeros((6, 1), np.float32)
    plan = WindowPlan(4, 2)  # windows [0, 4) and [2, 6)
    calls = iter([np.full((4, 1), 1.0, np.float32), np.full((4, 1), 4.0, np.float32)])
    out = stitch(plan, frames, lambda x: next(calls))
    # weights of the earlier window across the two shared frames: 2/3, 1/3
    np.testing.assert_allclose(out[:, 0], [1, 1, 2, 3, 4, 4], rtol=1e-6)


def test_stitching_a_window_again_after_a_crash_changes_nothing() -> None:
    frames = np.random.default_rng(1).normal(size=(13, 3)).astype(np.float32)
    plan = WindowPlan(5, 2)
    context = lambda x: x + x.mean()  # noqa: E731  (depends on the whole window, so overlaps differ)
    np.testing.assert_array_equal(stitch(plan, frames, context, redo=1), stitch(plan, frames, context))


def test_uint8_frames_blend_with_rounding_and_stay_uint8() -> None:
    frames = np.zeros((6, 1), np.uint8)
    plan = WindowPlan(4, 2)
    calls = iter([np.full((4, 1), 10, np.uint8), np.full((4, 1), 250, np.uint8)])
    out = stitch(plan, frames, lambda x: next(calls))
    assert out.dtype == np.uint8 and out[:, 0].tolist() == [10, 10, 90, 170, 250, 250]


@pytest.mark.parametrize("num_frames", [4, 5, 7, 9, 13, 16, 57])
@pytest.mark.parametrize(("length", "overlap"), [(4, 1), (4, 2), (14, 1), (8, 3)])
def test_a_full_last_window_has_the_plan_length_with_an_overlap_of_one_and_always_stitches_exactly(num_frames: int, length: int, overlap: int) -> None:
    plan = WindowPlan(length, overlap, last="full")
    windows = plan.windows(num_frames)
    assert windows[0].start == 0 and windows[-1].stop == num_frames
    for before, after in zip(windows, windows[1:]):
        assert after.start <= before.stop - overlap and before.tail == after.head
    for two_before, after in zip(windows, windows[2:]):
        assert after.start >= two_before.stop  # stitching holds one earlier window's tail at a time
    if num_frames >= length and overlap == 1:  # with more overlap it stops short of the window two before
        assert all(w.stop - w.start == length for w in windows)
    frames = np.random.default_rng(num_frames).normal(size=(num_frames, 3)).astype(np.float32)
    np.testing.assert_allclose(stitch(plan, frames, lambda x: 3 * x - 1), 3 * frames - 1, rtol=1e-5, atol=1e-6)


def test_a_short_last_window_stays_short_by_default() -> None:
    assert [(w.start, w.stop) for w in WindowPlan(4, 1).windows(8)] == [(0, 4), (3, 7), (6, 8)]
    assert [(w.start, w.stop) for w in WindowPlan(4, 1, last="full").windows(8)] == [(0, 4), (3, 7), (4, 8)]
