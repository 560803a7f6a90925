"""decode_mask through the stage seam: one image, a folder of images or a mask video, sized with the frames;
wrong counts, sizes and non-masks refused before any model loads; a folder hashed by its files."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reelflow.core.video import encode_mp4
from reelflow.flows.dag import plan_run
from reelflow.flows.edit import prepare_run
from reelflow.flows.sources import hash_sources, source_urls
from reelflow.schemas.calls import StoreSpec
from reelflow.schemas.errors import SourceError, SpecError
from reelflow.schemas.loading import load_spec
from reelflow.schemas.settings import Settings
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import task_for

FRAMES = 6  # of the 24-frame, 96x64 clip, decoded at 64x48 (scaled to 72x48, 4 columns cropped each side)


def half(width: int = 96, height: int = 64, left: bool = False) -> np.ndarray:
    """White on the right half (or the left)."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, slice(None, width // 2) if left else slice(width // 2, None)] = 255
    return mask


def mask_spec(clip: Path, mask: Path, store: Path, **params):
    return load_spec({"name": "masks", "input": str(clip), "store": str(store),
                      "sources": {"mask": {"kind": "mask", "path": str(mask)}},
                      "stages": [{"stage": "decode_video", "params": {"num_frames": FRAMES, "width": 64, "height": 48}},
                                 {"stage": "decode_mask", "params": params}]})  # fmt: skip


def run(spec) -> tuple:  # noqa: ANN001
    sources = hash_sources(spec, source_urls(spec), Settings())
    planned = plan_run(spec, sources=sources, store=StoreSpec(url=spec.store), run_id="r", default_dtype="float32")
    refs = {p.id: task_for(p.call.stage).fn(call=p.call) for p in planned}
    return ArtifactStore(spec.store).open("decode_mask", refs["decode_mask"].key), {p.id: p.key for p in planned}


def test_one_image_at_the_videos_size_is_cropped_with_the_frames(clip: Path, tmp_path: Path) -> None:
    Image.fromarray(half()).save(tmp_path / "mask.png")
    masks, _ = run(mask_spec(clip, tmp_path / "mask.png", tmp_path / "store"))
    assert masks["mask"].shape == (FRAMES, 48, 64) and masks["mask"].dtype == bool
    expected = np.zeros((48, 64), bool)
    expected[:, 32:] = True  # the video's right half stays the frames' right half under a centred crop
    assert (masks["mask"][:] == expected).all() and masks.attrs["form"] == "image" and masks.attrs["resized"]
    np.testing.assert_allclose(masks["coverage"][:], 0.5)


def test_a_folder_gives_each_frame_its_own_mask_and_is_hashed_by_its_files(clip: Path, tmp_path: Path) -> None:
    folder = tmp_path / "masks"
    folder.mkdir()
    for i in range(FRAMES):
        Image.fromarray(half(64, 48, left=i % 2 == 0)).save(folder / f"{i:05d}.png")  # at the frames' size
    masks, keys = run(mask_spec(clip, folder, tmp_path / "store"))
    assert masks.attrs["form"] == "sequence" and not masks.attrs["resized"]
    assert masks["mask"][0, :, :32].all() and not masks["mask"][1, :, :32].any()
    Image.fromarray(half(64, 48)).save(folder / "00000.png")
    _, again = run(mask_spec(clip, folder, tmp_path / "store"))
    assert again["decode_mask"] != keys["decode_mask"] and again["decode_video"] == keys["decode_video"]


def test_a_mask_video_with_one_mask_per_source_frame(clip: Path, tmp_path: Path) -> None:
    frames = np.zeros((24, 64, 96, 3), np.uint8)
    frames[::2, :, 48:] = 255  # even source frames: right half
    frames[1::2, :, :48] = 255  # odd: left half
    encode_mp4(tmp_path / "mask.mp4", frames, Fraction(24))
    masks, _ = run(mask_spec(clip, tmp_path / "mask.mp4", tmp_path / "store"))
    assert masks.attrs["form"] == "video" and masks.attrs["count"] == 24
    assert masks["mask"][0, :, 40:].all() and masks["mask"][1, :, :24].all() and not masks["mask"][1, :, 40:].any()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda folder: [Image.fromarray(half()).save(folder / f"{i}.png") for i in range(4)],
         "holds 4 masks but the edit takes 6 frames of a 24-frame video; give 1 mask"),
        (lambda folder: Image.fromarray(half(50, 50)).save(folder / "0.png"), "the masks are 50x50 but the video is 96x64"),
        (lambda folder: Image.fromarray(np.tile(np.arange(96, dtype=np.uint8) * 2, (64, 1))).save(folder / "0.png"),
         "is not a mask: .* of mask 0's pixels are grey"),
    ],
)
def test_masks_that_do_not_fit_are_refused_before_any_model_loads(make, message: str, clip: Path, tmp_path: Path) -> None:  # noqa: ANN001
    folder = tmp_path / "masks"
    folder.mkdir()
    make(folder)
    with pytest.raises((SpecError, SourceError), match=message):
        prepare_run(mask_spec(clip, folder, tmp_path / "store"), Settings())
