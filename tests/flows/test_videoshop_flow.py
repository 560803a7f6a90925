"""Videoshop end to end on the tiny SVD bundle: a long clip keeps its frames, rate and sound, and a
bulk run gives each clip its own edited frame."""

from __future__ import annotations

import io
import json
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
from PIL import Image

from reelflow.core.synthetic import write_edited_first_frame, write_synthetic_clip
from reelflow.core.video import probe_video
from reelflow.deployments import spec_path
from reelflow.flows.bulk import bulk_edit
from reelflow.flows.edit import edit_video
from reelflow.schemas.errors import StageFailed
from reelflow.schemas.loading import load_spec
from reelflow.storage.store import ArtifactStore

pytestmark = pytest.mark.flow
TINY = ("stages.decode_video.params.width=64", "stages.decode_video.params.height=64",
        "stages.decode_video.params.multiple=8", "stages.invert_latents.params.num_steps=4")  # fmt: skip


def videoshop(svd: Path, tmp_path: Path, *overrides: str):
    paths = (f"models.svd.id={svd}", f"store={tmp_path / 'store'}", f"output={tmp_path / 'out'}")
    return load_spec(spec_path("videoshop"), [*paths, *TINY, *overrides])


def test_a_clip_of_many_windows_keeps_its_frame_count_rate_and_sound(tiny_svd: Path, tmp_path: Path) -> None:
    clip = tmp_path / "long.mp4"
    write_synthetic_clip(clip, width=96, height=64, fps=12, seconds=1.5)  # 18 frames: 6 windows of 4
    write_edited_first_frame(clip, tmp_path / "long.edit.png")
    manifest = edit_video(videoshop(tiny_svd, tmp_path, f"input={clip}"))
    assert manifest.status == "completed"
    stages = {r.name: r for r in manifest.stages}
    store = ArtifactStore(manifest.store)
    assert len(store.open("invert_latents", stages["invert_latents"].key).attrs["windows"]["spans"]) == 6
    info = probe_video(io.BytesIO(Path(manifest.outputs["encode_video"]).read_bytes()))
    assert (info.num_frames, info.fps, info.has_audio) == (18, Fraction(12), True)
    mismatch = store.open("denoise_latents", stages["denoise_latents"].key)["boundary_mismatch"][1:]
    assert (mismatch[:, 1] < mismatch[:, 0]).all()  # the colour match brings shared frames closer
    pictures = {(stage, name): Image.open(io.BytesIO(store.fs.cat(store.abspath(f"pictures/{stage}/{stages[stage].key}/{name}.png"))))
                for stage, name in (("embed_content", "first-frames"), ("invert_latents", "reconstruction-error"),
                                    ("denoise_latents", "condition-frames"))}  # fmt: skip
    assert pictures["invert_latents", "reconstruction-error"].width == 18 * 7 + 1  # one bar per frame
    first, conditions = pictures["embed_content", "first-frames"], pictures["denoise_latents", "condition-frames"]
    assert (conditions.width, conditions.height) == (2 * first.width - 3, 2 * first.height)  # 6 windows: 2 rows of 4 tiles


def test_bulk_edits_each_clip_with_its_sidecar_and_fails_the_one_without(tiny_svd: Path, clip: Path, tmp_path: Path) -> None:
    library = tmp_path / "library"
    library.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(clip, library / f"{name}.mp4")
    for name in ("a", "b"):
        write_edited_first_frame(clip, library / f"{name}.edit.png")
    spec = videoshop(tiny_svd, tmp_path, "stages.decode_video.params.num_frames=4")
    with pytest.raises(StageFailed, match=r"1 of 3 clips failed: c\.mp4 \(SourceError: image source 'edited_frame'"):
        bulk_edit(library=str(library / "*.mp4"), spec=spec, output=str(tmp_path / "out"))
    rows = {Path(row["clip"]).stem: row for row in json.loads((tmp_path / "out" / "videoshop.bulk.json").read_text())["clips"]}
    assert rows["a"]["status"] == rows["b"]["status"] == "completed"
    assert rows["c"]["status"] == "failed" and "c.edit.png' does not exist" in rows["c"]["error"]
    assert "--source edited_frame=PATH" in rows["c"]["error"]
