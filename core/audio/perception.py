"""Meta's Perception Encoder Audio-Visual (PE-AV; Vyas et al. 2025, "Pushing the Frontier of Audiovisual
Perception with Large-Scale Multimodal Correspondence Learning", arXiv 2512.19687) as transformers 5 ships it:
a sound and an image embedded in one shared space, for Soundini's sound guidance in place of the CLIP-aligned
audio encoders of :mod:`reelflow.core.audio.encoders`.

The audio-video pair of that space is the one ``PeAudioVideoModel.forward`` scores as ``logits_audio_video``:
``audio_model.audio_head(audio_encoder(input_values).pooler_output)`` against
``video_model.video_head(video_encoder(pixel_values_videos).pooler_output)``, both ``text_config.hidden_size``
wide (1024 for facebook/pe-av-*). The hub checkpoints are one ``pe_audio_video`` model; a ``pe_audio`` or
``pe_video`` model alone works too, so each side is found through its tower registry by ``model_type``.

Notes on transformers 5.24 that shape this module:

- the audio tower's DAC codec runs under ``torch.no_grad``, so audio embeddings carry no gradient to the waveform;
  they are computed once per frame window (the ``embed_audio`` stage) and read back;
- ``PeVideoModel.get_video_features`` is defined inside ``__init__`` and ``PeAudioVideoModel.get_video_embeds``
  calls a method the video model lacks, so the image side here runs the video tower and its head directly, the
  way ``PeVideoModel.forward`` does, each image a one-frame video;
- a loaded video processor does nothing its config does not switch on (``do_resize`` and the rest default to
  None), so :func:`image_embeddings` follows the same switches.

Windows: frame ``i``'s window of ``window_seconds`` is centred on the middle of the frame's time span, as for the
CLIP-aligned encoders, but in samples at the feature extractor's rate. Every window is exactly that many samples,
the sound where the window overlaps the track and silence where it does not, so no window is padded by its
neighbours in a batch and the embeddings do not depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reelflow.core.audio.spectrogram import FrameWindows, centred_windows

# model_type -> the tower of a loaded model; the PE-AV checkpoints are pe_audio_video.
AUDIO_TOWERS: dict[str, Callable[[Any], Any]] = {
    "pe_audio_video": lambda model: model.audio_model,
    "pe_audio": lambda model: model,
}
VIDEO_TOWERS: dict[str, Callable[[Any], Any]] = {
    "pe_audio_video": lambda model: model.video_model,
    "pe_video": lambda model: model,
}


def audio_tower(model: Any) -> Any:
    """The ``PeAudioModel`` of a loaded PE model (the model itself, or a ``PeAudioVideoModel``'s ``audio_model``).

    Raises:
        ValueError: A model of another type; the message lists the known ones.
    """
    return _tower(model, AUDIO_TOWERS, "audio")


def video_tower(model: Any) -> Any:
    """The ``PeVideoModel`` of a loaded PE model (the model itself, or a ``PeAudioVideoModel``'s ``video_model``).

    Raises:
        ValueError: A model of another type; the message lists the known ones.
    """
    return _tower(model, VIDEO_TOWERS, "video")


def _tower(model: Any, towers: dict[str, Callable[[Any], Any]], side: str) -> Any:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in towers:
        raise ValueError(f"a {type(model).__name__} (model_type {kind!r}) has no Perception Encoder {side} tower; "
                         f"known model types: {', '.join(towers)}")  # fmt: skip
    return towers[kind](model)


def embedding_width(source: Any) -> int:
    """Width of the shared audio-video space of a PE model, its config, or its ``config.json`` as a dict (what a
    preflight reads without loading weights): both heads project to ``text_config.hidden_size``.

    Raises:
        ValueError: Not a Perception Encoder audio, video or audio-video model.
    """
    from transformers import CONFIG_MAPPING

    config = getattr(source, "config", source)
    if isinstance(config, dict):
        kind = config.get("model_type")
        if kind not in AUDIO_TOWERS | VIDEO_TOWERS:
            raise ValueError(f"config.json names model_type {kind!r}, not a Perception Encoder audio or video model "
                             f"({', '.join(AUDIO_TOWERS | VIDEO_TOWERS)})")  # fmt: skip
        config = CONFIG_MAPPING[kind].from_dict({k: v for k, v in config.items() if k != "model_type"})
    kind = getattr(config, "model_type", None)
    if kind not in AUDIO_TOWERS | VIDEO_TOWERS:
        raise ValueError(f"model_type {kind!r} is not a Perception Encoder audio or video model "
                         f"({', '.join(AUDIO_TOWERS | VIDEO_TOWERS)})")  # fmt: skip
    return int(config.text_config.hidden_size)


def image_width(config: dict[str, Any]) -> int:
    """Width of the image embeddings of a CLIP (its projection) or Perception Encoder (its shared space) model, from
    its ``config.json``."""
    if config.get("model_type") in VIDEO_TOWERS:
        return embedding_width(config)
    return int(config.get("projection_dim", (config.get("vision_config") or {}).get("projection_dim", 512)))


@dataclass(frozen=True)
class SampleWindows:
    """Each frame's window of a waveform at ``rate``: ``width`` samples from ``first`` (``(F,)``, possibly before the
    track's start or past its end, ``length`` samples)."""

    first: np.ndarray  # (F,) int
    width: int
    length: int
    rate: int

    def cut(self) -> FrameWindows:
        """The part of each window on the track, in samples, with its time span (what the sound covers)."""
        return centred_windows(self.first, self.width, self.length, 1.0 / self.rate)

    def waveforms(self, waveform: np.ndarray, indices: range | np.ndarray) -> np.ndarray:
        """``(n, width)`` float32: each window's samples, silence where it is off the track."""
        out = np.zeros((len(indices), self.width), np.float32)
        cut = self.cut()
        for row, i in enumerate(indices):
            start, stop = int(cut.start[i]), int(cut.stop[i])
            offset = start - int(self.first[i])
            out[row, offset : offset + stop - start] = waveform[start:stop]
        return out


def sample_windows(frame_starts: np.ndarray, frame_seconds: float, window_seconds: float, length: int,
                   rate: int) -> SampleWindows:  # fmt: skip
    """Frame ``i``'s window: ``window_seconds`` of a ``length``-sample waveform at ``rate``, centred on the middle of
    ``[frame_starts[i], frame_starts[i] + frame_seconds)`` (times on the track's clock)."""
    width = max(1, int(np.rint(window_seconds * rate)))
    centre = np.rint((np.asarray(frame_starts, np.float64) + frame_seconds / 2.0) * rate).astype(np.int64)
    return SampleWindows(first=centre - width // 2, width=width, length=length, rate=rate)


def audio_embeddings(model: Any, feature_extractor: Any, waveforms: np.ndarray, sampling_rate: int) -> torch.Tensor:
    """``(n, D)`` float32 embeddings, on the CPU, of ``waveforms (n, samples)`` (mono, at ``sampling_rate``, which
    must be the feature extractor's) through the feature extractor and the audio tower's ``get_audio_embeds``.

    Raises:
        ValueError: ``sampling_rate`` differs from the feature extractor's (raised by it).
    """
    tower = audio_tower(model)
    inputs = feature_extractor(list(waveforms), sampling_rate=sampling_rate, return_tensors="pt")
    parameter = next(tower.parameters())
    mask = inputs.get("padding_mask")
    with torch.inference_mode():
        embedded = tower.get_audio_embeds(inputs["input_values"].to(parameter.device, parameter.dtype),
                                          None if mask is None else mask.to(parameter.device))  # fmt: skip
    return embedded.float().cpu()


def image_embeddings(model: Any, images: torch.Tensor, processor: Any) -> torch.Tensor:
    """``(N, D)`` embeddings, differentiable w.r.t. ``images (N, 3, H, W)`` in [0, 1], in the shared space: each
    image a one-frame video through the video tower and its head.

    ``processor`` is the model's video processor (``AutoVideoProcessor``) or its processor (``AutoProcessor``, whose
    ``video_processor`` is used); its own resize, centre crop and normalisation are applied, as its config switches
    them on, to float pixels (the processor's rescale of 8-bit pixels to [0, 1] is where ``images`` already are).
    """
    from transformers.image_utils import SizeDict

    video = getattr(processor, "video_processor", processor)
    x = images
    if video.do_resize:
        x = video.resize(x, size=SizeDict(**dict(video.size)), resample=video.resample)
    if video.do_center_crop:
        x = video.center_crop(x, SizeDict(**dict(video.crop_size)))
    if video.do_normalize:
        mean = torch.as_tensor(video.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(video.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    tower = video_tower(model)
    parameter = next(tower.parameters())
    pooled = tower.video_encoder(pixel_values_videos=x[:, None].to(parameter.device, parameter.dtype)).pooler_output
    return tower.video_head(pooled)
