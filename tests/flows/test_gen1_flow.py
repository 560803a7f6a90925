"""A Gen-1 sweep end to end: a new structure level reruns only its own edit, never the depth."""

from __future__ import annotations

from pathlib import Path

import pytest

from reelflow.core.tiny_depth import build_tiny_depth_anything
from reelflow.core.tiny_gen1 import build_tiny_controlnet, build_tiny_ip_adapter
from reelflow.deployments import spec_path
from reelflow.flows.edit import edit_video
from reelflow.schemas.loading import load_spec

pytestmark = pytest.mark.flow


def test_sweeping_t_s_again_reuses_the_depth_and_the_edits_already_made(tiny_bundle: Path, clip: Path, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 120, 40)).save(tmp_path / "reference.png")
    models = (f"models.sd.id={tiny_bundle}", f"models.controlnet.id={build_tiny_controlnet(tmp_path / 'cn')}",
              f"models.depth.id={build_tiny_depth_anything(tmp_path / 'depth')}",
              f"models.ip_adapter.id={build_tiny_ip_adapter(tmp_path / 'ip')}", f"sources.reference.path={tmp_path / 'reference.png'}")  # fmt: skip
    small = ("stages.decode_video.params.num_frames=4", "stages.decode_video.params.width=64",
             "stages.decode_video.params.height=64", "stages.decode_video.params.multiple=8",
             "stages.denoise_latents.params.num_steps=4", "stages.denoise_latents.params.window=4",
             "stages.denoise_latents.params.overlap=0")  # fmt: skip
    paths = (f"input={clip}", f"store={tmp_path / 'store'}", f"output={tmp_path / 'out'}")

    def sweep(levels: str):
        spec = load_spec(spec_path("gen1-controlnet"), [*models, *small, *paths, f"stages.denoise_latents.each={levels}"])
        return {r.name: r.status for r in edit_video(spec).stages}

    first = sweep("[{t_s: 0}, {t_s: 3}]")
    assert set(first.values()) == {"computed"}
    second = sweep("[{t_s: 0}, {t_s: 5}]")
    assert second["estimate_depth"] == second["embed_content"] == second["encode_latents"] == "cached"
    assert second["denoise_latents_0"] == "cached" and second["denoise_latents_1"] == "computed"


def test_in_a_bulk_edit_only_the_clips_with_a_mask_use_one(tiny_bundle: Path, clip: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from PIL import Image

    from reelflow.flows.bulk import bulk_edit

    library = tmp_path / "library"
    library.mkdir()
    for name in ("a", "b"):
        shutil.copy(clip, library / f"{name}.mp4")
    Image.new("L", (64, 64), 0).save(library / "a.mask.png")  # a keeps its source everywhere; b has no mask
    for name in ("a", "b"):
        Image.new("RGB", (32, 32), (200, 120, 40)).save(library / f"{name}.reference.png")  # each clip brings its reference
    overrides = [f"models.sd.id={tiny_bundle}", f"models.controlnet.id={build_tiny_controlnet(tmp_path / 'cn')}",
                 f"models.depth.id={build_tiny_depth_anything(tmp_path / 'depth')}",
                 f"models.ip_adapter.id={build_tiny_ip_adapter(tmp_path / 'ip')}",
                 "sources.mask={kind: mask, sidecar: '{stem}.mask.png'}", "stages.decode_video.params.num_frames=4",
                 "stages.decode_video.params.width=64", "stages.decode_video.params.height=64",
                 "stages.decode_video.params.multiple=8", "stages.denoise_latents.params.num_steps=4",
                 "stages.denoise_latents.params.window=4", "stages.denoise_latents.params.overlap=0",
                 "stages.denoise_latents.each=[{t_s: 0}]"]  # fmt: skip
    spec = load_spec(spec_path("gen1-controlnet"), [*overrides, f"store={tmp_path / 'store'}"])
    report = bulk_edit(library=str(library / "*.mp4"), spec=spec, output=str(tmp_path / "out"))
    assert [row.status for row in report.clips] == ["completed", "completed"]
    manifests = {path.name.split(".")[0]: json.loads(path.read_text()) for path in (tmp_path / "out").rglob("*.manifest.json")}
    assert set(manifests["a"]["sources"]) == {"mask", "reference"} and set(manifests["b"]["sources"]) == {"reference"}
    keys = {clip: {s["name"]: s["key"] for s in m["stages"]} for clip, m in manifests.items()}
    assert keys["a"]["estimate_depth"] == keys["b"]["estimate_depth"]
    assert keys["a"]["denoise_latents_0"] != keys["b"]["denoise_latents_0"]
    again = bulk_edit(library=str(library / "*.mp4"), spec=spec, output=str(tmp_path / "out"))
    assert [row.status for row in again.clips] == ["exists", "exists"]  # the clip without a mask is done too
