"""Masks per frame (issue: Soundini's region): which mask each frame takes, which size they come at, binary at a
stated threshold, and sized with the frames by their own plan."""

from __future__ import annotations

import numpy as np
import pytest

from reelflow.core.frames import plan_resize, resize_frames
from reelflow.core.masks import MaskLayout, binarise, check_size, pick_masks, resize_masks
from reelflow.schemas.errors import SourceError


def test_each_frame_takes_one_mask_by_count() -> None:
    selected = [4, 6, 8]
    assert pick_masks(MaskLayout("image", 1, 8, 8), selected, 30) == [0, 0, 0]
    assert pick_masks(MaskLayout("sequence", 3, 8, 8), selected, 30) == [0, 1, 2]
    assert pick_masks(MaskLayout("video", 30, 8, 8), selected, 30) == [4, 6, 8]  # by source index
    with pytest.raises(SourceError, match="holds 5 masks but the edit takes 3 frames of a 30-frame video; give 1 mask"):
        pick_masks(MaskLayout("sequence", 5, 8, 8), selected, 30)


def test_masks_come_at_the_videos_size_or_the_frames() -> None:
    assert check_size(MaskLayout("image", 1, 96, 64), (96, 64), (64, 48)) is True
    assert check_size(MaskLayout("image", 1, 64, 48), (96, 64), (64, 48)) is False
    with pytest.raises(SourceError, match="the masks are 50x50 but the video is 96x64 and its frames 64x48"):
        check_size(MaskLayout("image", 1, 50, 50), (96, 64), (64, 48))


def test_anti_aliased_edges_pass_a_photograph_does_not() -> None:
    mask = np.zeros((1, 20, 20), np.float32)
    mask[:, 5:15, 5:15] = 1.0
    mask[:, 4, 5:15] = 0.5  # an anti-aliased edge: 2.5% of the pixels
    assert binarise(mask, 0.5, "m").sum() == 110
    assert binarise(mask, 0.6, "m").sum() == 100  # the stated threshold decides the edge
    photo = np.linspace(0, 1, 400, dtype=np.float32).reshape(1, 20, 20)
    with pytest.raises(SourceError, match="m is not a mask: 80% of mask 0's pixels are grey"):
        binarise(photo, 0.5, "m")


def test_masks_follow_the_frames_own_crop() -> None:
    plan = plan_resize(96, 64, width=64, height=48, fit="crop", multiple=8)
    mask = np.zeros((1, 64, 96), np.float32)
    mask[:, :, 48:] = 1.0  # the right half of the video
    frames = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=-1)
    np.testing.assert_allclose(resize_masks(mask, plan), resize_frames(frames, plan)[..., 0] / 255.0)
    assert resize_masks(mask, None) is mask
