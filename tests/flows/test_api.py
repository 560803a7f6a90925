"""The Python entry points a user reaches for: load a spec, run it on a clip, open what it stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reelflow.api import load_spec, open_artifact, open_dataset, run
from reelflow.schemas.errors import ArtifactNotFound, SpecError

pytestmark = pytest.mark.flow
TINY = ["stages.decode_video.params.num_frames=4", "stages.decode_video.params.width=64",
        "stages.decode_video.params.height=64", "stages.decode_video.params.multiple=8",
        "stages.encode_video.params.preset=ultrafast"]  # fmt: skip


def test_run_a_preset_then_open_its_artifacts_as_zarr_and_xarray(tiny_bundle: Path, clip: Path, tmp_path: Path) -> None:
    spec = load_spec("reconstruct", [f"models.sd.id={tiny_bundle}", *TINY])
    assert spec.name == "reconstruct" and spec.input is None
    manifest = run(spec, input=str(clip), store=str(tmp_path / "store"), output=str(tmp_path / "out"))
    assert manifest.status == "completed" and Path(manifest.outputs["encode_video"]).is_file()

    decoded = next(r for r in manifest.stages if r.name == "decode_video")
    group = open_artifact(decoded.artifact)
    dataset = open_dataset(decoded.artifact)
    np.testing.assert_array_equal(dataset["frames"].values, group["frames"][:])
    assert dataset["frames"].dims == ("frame", "y", "x", "rgb") and dataset.attrs["provenance"]["key"] == decoded.key
    by_key = open_artifact(decoded.key[:10], store=str(tmp_path / "store"))
    assert by_key.attrs["provenance"]["stage"] == "decode_video"


def test_run_takes_named_sources_and_refuses_unknown_ones(tiny_bundle: Path, clip: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="pipeline 'reconstruct' has no source 'reference'; its sources: video"):
        run("reconstruct", input=str(clip), sources={"reference": "ref.png"}, overrides=[f"models.sd.id={tiny_bundle}"])
    with pytest.raises(ArtifactNotFound, match="no artifact"):
        open_artifact("abcdef0123", store=str(tmp_path))
