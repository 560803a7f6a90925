"""Flow tests share one Prefect server for the session and build specs on the tiny bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from reelflow.deployments import spec_path
from reelflow.schemas.loading import load_spec
from reelflow.schemas.pipeline import PipelineSpec

TINY_OVERRIDES = (
    "stages.decode_video.params.num_frames=6",
    "stages.decode_video.params.width=64",
    "stages.decode_video.params.height=64",
    "stages.decode_video.params.multiple=8",
    "stages.encode_latents.params.chunk_size=2",
    "stages.decode_latents.params.chunk_size=2",
    "stages.encode_video.params.preset=ultrafast",
)


# FateZero on the tiny bundle in seconds: 3 frames at 64x64, 4 DDIM steps, cross-frame attention everywhere.
FATEZERO_TINY = (
    "stages.decode_video.params.num_frames=3",
    "stages.decode_video.params.width=64",
    "stages.decode_video.params.height=64",
    "stages.decode_video.params.multiple=8",
    "stages.invert_latents.params.num_steps=4",
    "stages.invert_latents.params.min_channels=0",
    "stages.invert_latents.params.source_prompt=a cat walking on a street",
    "stages.encode_video.params.preset=ultrafast",
)


@pytest.fixture(autouse=True)
def _harness(prefect_harness: str) -> str:
    return prefect_harness


@pytest.fixture
def make_spec(tiny_bundle: Path, clip: Path, tmp_path: Path):
    """Build the reconstruct preset on the tiny bundle; extra ``key=value`` overrides win."""

    def make(*overrides: str, input: Path | None = None, store: Path | None = None) -> PipelineSpec:
        base = (
            f"models.sd.id={tiny_bundle}",
            f"input={input or clip}",
            f"store={store or tmp_path / 'store'}",
            f"output={tmp_path / 'out'}",
        )
        return load_spec(spec_path("reconstruct"), [*base, *TINY_OVERRIDES, *overrides])

    return make
