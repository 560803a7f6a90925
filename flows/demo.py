"""``reelflow demo``: a synthetic clip, a tiny model bundle, and a preset wired to both.

The tiny sizes keep every preset to seconds on a CPU: 96x64 frames and, for FateZero, a few DDIM
steps with cross-frame attention on every layer (the tiny UNet has no 640-channel level).
"""

from __future__ import annotations

import json
from pathlib import Path

from reelflow.core.synthetic import write_synthetic_clip
from reelflow.core.tiny import build_tiny_bundle
from reelflow.deployments import spec_path
from reelflow.schemas.loading import load_spec
from reelflow.schemas.pipeline import PipelineSpec

DEMO_OVERRIDES = (
    "stages.decode_video.params.num_frames=12",
    "stages.decode_video.params.width=96",
    "stages.decode_video.params.height=64",
    "stages.decode_video.params.multiple=8",
)
FATEZERO_OVERRIDES = (
    "stages.decode_video.params.num_frames=6",
    "stages.invert_latents.params.num_steps=6",
    "stages.invert_latents.params.min_channels=0",
)


def prepare_demo(workdir: Path, preset: str = "reconstruct") -> PipelineSpec:
    """Make (once) the clip and the tiny bundle under ``workdir``; return ``preset`` pointed at them."""
    workdir.mkdir(parents=True, exist_ok=True)
    clip = workdir / "source.mp4"
    if not clip.is_file():
        write_synthetic_clip(clip, width=96, height=64, fps=24, seconds=2.0)
    bundle = workdir / "models" / "tiny-sd"
    if not (bundle / "model_index.json").is_file():
        build_tiny_bundle(bundle, seed=0)
    paths = (
        f"input={json.dumps(str(clip))}",
        f"store={json.dumps(str(workdir / 'store'))}",
        f"output={json.dumps(str(workdir / 'output'))}",
        f"models.sd.id={json.dumps(str(bundle))}",
    )
    sizes = [*DEMO_OVERRIDES, *(FATEZERO_OVERRIDES if preset.startswith("fatezero") else ())]
    return load_spec(spec_path(preset), [*paths, *sizes])
