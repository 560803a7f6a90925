"""Region masks per frame: one image for every frame, an image sequence (a folder of images, one per frame in
name order), or a mask video; sized with the frames by the same plan and made binary at a stated threshold.

A mask is white where the edit happens. Masks come either at the source video's size (then the
frames' own resize plan is applied: the same scale and the same crop or pad) or already at the
frames' size. Their count is 1 (every frame), the number of selected frames (one each), or the
source video's frame count (then each selected frame takes the mask of its own source index).
Anti-aliased edges are fine; a picture that is mostly grey is not a mask, and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, Literal

import fsspec
import numpy as np

from reelflow.schemas.errors import SourceError

if TYPE_CHECKING:
    from reelflow.core.frames import ResizePlan

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
GREY_BAND = (0.1, 0.9)  # values strictly between are neither inside nor outside
MAX_GREY_FRACTION = 0.05  # anti-aliased edges, not a photograph
MaskForm = Literal["image", "sequence", "video"]


@dataclass(frozen=True)
class MaskLayout:
    """What a mask source holds: its form, how many masks, and their size."""

    form: MaskForm
    count: int
    width: int
    height: int


def sequence_files(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    """The image files directly in ``folder``, in name order (``00000.png``, ``00001.png``, ...)."""
    names = [p for p in fs.ls(folder, detail=False) if PurePosixPath(p).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(names, key=lambda p: PurePosixPath(p).name)


def pick_masks(layout: MaskLayout, selected: Sequence[int], source_frames: int) -> list[int]:
    """Which of the source's masks each selected frame takes (``selected``: the frames' source indices).

    Raises:
        SourceError: A count that is neither 1, the selected frames' nor the source video's.
    """
    if layout.count == 1:
        return [0] * len(selected)
    if layout.count == len(selected):
        return list(range(len(selected)))
    if layout.count == source_frames:
        return list(selected)
    raise SourceError(f"the mask {layout.form} holds {layout.count} masks but the edit takes {len(selected)} frames of a "
                      f"{source_frames}-frame video; give 1 mask (every frame), {len(selected)} (one per selected frame) "
                      f"or {source_frames} (one per source frame)")  # fmt: skip


def check_size(layout: MaskLayout, source: tuple[int, int], output: tuple[int, int]) -> bool:
    """Whether the masks need the frames' resize plan (True: at the source's size; False: at the frames').

    Raises:
        SourceError: Neither size.
    """
    size = (layout.width, layout.height)
    if size == source:
        return True
    if size == output:
        return False
    raise SourceError(f"the masks are {size[0]}x{size[1]} but the video is {source[0]}x{source[1]} and its frames "
                      f"{output[0]}x{output[1]}; give masks at either size")  # fmt: skip


def binarise(masks: np.ndarray, threshold: float, what: str) -> np.ndarray:
    """``masks`` ``(N, H, W)`` in [0, 1] as bool at ``threshold``, after refusing ones that are mostly grey.

    Raises:
        SourceError: More than 5% of a mask's pixels lie strictly between 0.1 and 0.9.
    """
    grey = ((masks > GREY_BAND[0]) & (masks < GREY_BAND[1])).reshape(len(masks), -1).mean(axis=1)
    if len(grey) and grey.max() > MAX_GREY_FRACTION:
        worst = int(grey.argmax())
        raise SourceError(f"{what} is not a mask: {grey[worst]:.0%} of mask {worst}'s pixels are grey (between "
                          f"{GREY_BAND[0]} and {GREY_BAND[1]}); give black and white images (white: the region to edit), "
                          f"which are cut at {threshold}")  # fmt: skip
    return masks >= threshold


def resize_masks(masks: np.ndarray, plan: ResizePlan | None) -> np.ndarray:
    """``masks`` ``(N, H, W)`` in [0, 1] through the frames' resize ``plan`` (None: already at their size)."""
    if plan is None:
        return masks
    from reelflow.core.frames import resize_frames  # torch: not at import, so the command line starts without it

    grey = np.repeat((masks * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    return resize_frames(grey, plan)[..., 0].astype(np.float32) / 255.0


def probe_masks(fs: fsspec.AbstractFileSystem, path: str) -> MaskLayout:
    """What the mask source at ``path`` holds, from headers alone: a folder is a sequence, an image one mask, a
    video one mask per frame.

    Raises:
        SourceError: An empty folder, or a file that is neither an image nor a video.
    """
    from PIL import Image

    if fs.isdir(path):
        files = sequence_files(fs, path)
        if not files:
            raise SourceError(f"the mask folder {path!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); give one image per "
                              "frame, named in frame order")  # fmt: skip
        with fs.open(files[0], "rb") as handle, Image.open(handle) as image:
            return MaskLayout("sequence", len(files), *image.size)
    with fs.open(path, "rb") as handle:
        return probe_handle(path, handle)


def probe_handle(name: str, handle: BinaryIO) -> MaskLayout:
    """What one mask file holds: an image (one mask for every frame) or a video (one per frame).

    Raises:
        SourceError: Neither.
    """
    from PIL import Image, UnidentifiedImageError

    from reelflow.core.video import probe_video

    try:
        with Image.open(handle) as image:
            return MaskLayout("image", 1, *image.size)
    except (UnidentifiedImageError, OSError):
        handle.seek(0)
    try:
        info = probe_video(handle)
    except Exception as exc:  # noqa: BLE001  (any failure to read it as a video: the message says what to give)
        raise SourceError(f"the mask {name!r} is neither an image nor a video ({exc}); give a PNG for every frame, a "
                          "folder of PNGs (one per frame) or a mask video") from None  # fmt: skip
    return MaskLayout("video", info.num_frames, info.width, info.height)


def read_masks(fs: fsspec.AbstractFileSystem, path: str, layout: MaskLayout, indices: Sequence[int]) -> np.ndarray:
    """Masks ``indices`` of the source as float32 ``(N, H, W)`` in [0, 1] at the source's size."""
    from reelflow.core.sources import read_image
    from reelflow.core.video import decode_frames

    if layout.form == "image":
        with fs.open(path, "rb") as handle:
            one = read_image("mask", handle, mask=True)
        return np.repeat(one[None], len(indices), axis=0)
    if layout.form == "sequence":
        files = sequence_files(fs, path)
        masks = []
        for i in indices:
            with fs.open(files[i], "rb") as handle:
                masks.append(read_image(f"mask {PurePosixPath(files[i]).name}", handle, mask=True))
        sizes = {m.shape for m in masks}
        if len(sizes) > 1:
            raise SourceError(f"the masks in {path!r} differ in size ({', '.join(f'{w}x{h}' for h, w in sorted(sizes))}); "
                              "give every frame's mask at one size")  # fmt: skip
        return np.stack(masks)
    with fs.open(path, "rb") as handle:
        frames = decode_frames(handle, list(indices))
    return frames.astype(np.float32).mean(axis=-1) / 255.0
