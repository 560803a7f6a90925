"""Named sources besides the video: check that a file is what the pipeline says it is, and read it.

A pipeline's sources are videos, images (an edited first frame, a reference image), masks and audio
clips. :func:`check_source` opens a file just far enough to tell it is readable as its kind, so a
wrong or broken file fails before any model loads, with one line naming the source and the fix.
"""

from __future__ import annotations

from typing import BinaryIO

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from reelflow.core.video import probe_video
from reelflow.schemas.errors import SourceError

_IMAGE_FIX = "give a PNG, JPEG or WebP image"


def check_source(name: str, kind: str, handle: BinaryIO) -> None:
    """Raise SourceError unless ``handle`` reads as a ``kind`` (video, image or audio; a mask source, which may be a
    folder, is checked by :func:`reelflow.core.masks.probe_masks`)."""
    if kind == "video":
        probe_video(handle)
    elif kind == "image":
        read_image(name, handle)
    elif kind == "audio":
        _probe_audio(name, handle)
    else:
        raise SourceError(f"source {name!r} has the kind {kind!r}, which check_source does not read; kinds: video, "
                          "image, audio (masks: core.masks.probe_masks)")  # fmt: skip


def read_image(name: str, handle: BinaryIO, *, mask: bool = False) -> np.ndarray:
    """An image as uint8 ``(H, W, 3)``, or a mask as float32 ``(H, W)`` in [0, 1] (white = 1)."""
    try:
        with Image.open(handle) as image:
            image.load()
            converted = image.convert("L" if mask else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise SourceError(f"source {name!r} is not a readable image ({exc}); {_IMAGE_FIX}") from None
    pixels = np.asarray(converted)
    return pixels.astype(np.float32) / 255.0 if mask else pixels


def _probe_audio(name: str, handle: BinaryIO) -> None:
    try:
        with av.open(handle) as container:
            if not container.streams.audio:
                raise SourceError(f"source {name!r} has no audio stream; give an audio file (WAV, FLAC, MP3, AAC) "
                                  "or a video with a sound track")  # fmt: skip
    except av.error.FFmpegError as exc:
        raise SourceError(f"source {name!r} is not a readable audio file ({exc}); give WAV, FLAC, MP3 or AAC") from None
