"""Stage declaration of ``embed_audio``: one embedding of the sound per video frame, in a space shared with
images, for any method or metric to read (Soundini's sound guidance, audio-visual similarity).

The sound is the ``audio`` source when the pipeline declares one (any file PyAV reads: WAV, FLAC,
MP3, AAC, or a video's track), else the clip's own track as ``decode_video`` stored it. Frame ``i``'s
window of ``window_seconds`` is centred on the middle of the frame's time span and embedded by the
``audio_encoder`` role, by its family:

- ``soundclip`` (Soundini's Swin, the CVPR 2022 ResNet18): the sound made mono at 44.1 kHz and turned
  into the log-mel spectrogram these CLIP-aligned encoders were trained on (methods.md 5.3, quirks
  included), each window of it embedded into CLIP ViT-B/32's 512-wide space;
- ``transformers`` (Meta's Perception Encoder Audio-Visual, facebook/pe-av-*): the waveform made mono
  at the feature extractor's rate (48 kHz), each window of it, silence where it is off the track,
  embedded by the audio tower into the space PE shares with images and video (1024 wide).

The log-mel spectrogram is stored either way, for inspection.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from reelflow.schemas.base import Model, PositiveInt
from reelflow.schemas.kinds import Attrs, register_kind
from reelflow.schemas.registry import Method
from reelflow.schemas.stages import Role, StageSpec, register_stage

AUDIO_ENCODER = Role(
    families=("soundclip", "transformers"),
    description="an audio encoder into a space shared with images: a CLIP-aligned one (Soundini's Swin, the CVPR 2022 "
    "ResNet18) in its published layout, or a Perception Encoder Audio-Visual model (facebook/pe-av-*)",
    tiny="soundclip-swin",
)
TRAINED_SECONDS = 864 * 512 / 44_100  # the encoders' input window, about 10.03 s


class AudioEmbeddings(Attrs):
    """What the sound was, how it was windowed per frame and what embedded it."""

    sound: Literal["source", "video"] = Field(description="source: the `audio` source file; video: the clip's own track.")
    sample_rate: int = Field(description="Rate the spectrogram was computed at (Hz).")
    hop_length: int = Field(description="Samples between spectrogram columns.")
    n_mels: int = Field(description="Mel bands.")
    window_seconds: float = Field(description="Length of each frame's window.")
    offset: float = Field(description="Where the sound's start falls on the video's clock, seconds.")
    backend: str = Field(description="What embedded it, e.g. 'soundclip:swin_tiny' or 'transformers:PeAudioModel'.")
    embedding_dim: int = Field(description="Width of an embedding.")


register_kind(
    "audio_embeddings",
    AudioEmbeddings,
    "one audio embedding per frame with its window's time span, and the log-mel spectrogram of the sound",
)


class EmbedAudioParams(Model):
    window_seconds: float = Field(
        default=1.0, gt=0.0, le=round(TRAINED_SECONDS, 2),
        description="Length of each frame's window, centred on the frame; shorter windows follow the sound more closely, "
        "longer ones are smoother. At most the CLIP-aligned encoders' 10 s input; shorter windows are zero-padded to it "
        "for them, as in training (a Perception Encoder embeds the window as it is).",
    )  # fmt: skip
    offset: float = Field(
        default=0.0, description="Where the sound file's start falls on the video's clock, seconds (a sound that starts "
        "2 s into the video: 2.0). Ignored for the clip's own track.",
    )  # fmt: skip
    batch_size: PositiveInt = Field(default=16, description="Windows per encoder call; bounds memory.")


@register_stage
class EmbedAudio(StageSpec):
    """Embed the sound one window per frame, aligned to the frame's time, with a CLIP-aligned audio encoder."""

    version: ClassVar[str] = "1"
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"frames": ("video_frames",)}
    produces: ClassVar[str] = "audio_embeddings"
    roles: ClassVar[dict[str, Role]] = {"audio_encoder": AUDIO_ENCODER}
    optional_reads: ClassVar[dict[str, str]] = {"audio": "audio"}

    stage: Literal["embed_audio"] = "embed_audio"
    params: EmbedAudioParams = Field(default_factory=EmbedAudioParams, description="Windowing options.")

    def key_params(self) -> dict[str, Any]:
        return {k: v for k, v in super().key_params().items() if k != "batch_size"}  # windows per call: same embeddings


METHOD = Method(
    name="audio",
    description="Per-frame audio embeddings in a space shared with images (Soundini's CLIP-aligned encoders, "
    "Perception Encoder Audio-Visual), for any method or metric.",
    implementations=("reelflow.tasks.audio",),
    tiny={
        "soundclip-swin": "reelflow.core.tiny_audio:build_tiny_soundclip_swin",
        "soundclip-resnet": "reelflow.core.tiny_audio:build_tiny_soundclip_resnet",
        "pe-av": "reelflow.core.tiny_audio:build_tiny_pe_av",
    },
)
