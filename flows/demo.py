"""``reelflow demo``: a synthetic clip, a tiny model bundle, and the reconstruct preset wired to both."""

from __future__ import annotations

import json
from pathlib import Path

from core.tiny import build_tiny_bundle
from core.synthetic import write_synthetic_clip
from flows.commands import resolve_spec_path
from schemas.loading import load_spec
from schemas.pipeline import PipelineSpec

DEMO_OVERRIDES = (
    "stages.decode_video.params.num_frames=12",
    "stages.decode_video.params.width=96",
    "stages.decode_video.params.height=64",
    "stages.decode_video.params.multiple=8",
    "stages.encode_latents.params.chunk_size=4",
    "stages.decode_latents.params.chunk_size=4",
)


def prepare_demo(workdir: Path) -> PipelineSpec:
    """Make (once) the clip and the tiny bundle under ``workdir``; return the preset pointed at them."""
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
    return load_spec(resolve_spec_path("reconstruct"), [*paths, *DEMO_OVERRIDES])
