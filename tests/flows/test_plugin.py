"""A method package from outside the repo (tests/plugins/reelflow-toy), installed as pip installs one
and driven through the `reelflow` CLI: its stages, preset, sources, windows and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from reelflow.schemas.loading import apply_override
from reelflow.storage.store import ArtifactStore

pytestmark = pytest.mark.flow
PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "reelflow-toy"


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy package installed into a folder of its own (no network, nothing added to the venv)."""
    source = tmp_path_factory.mktemp("toy-src") / "reelflow-toy"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("toy-site")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(target), str(source)]  # fmt: skip
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    return target


@pytest.fixture
def env(plugin_path: Path, prefect_harness: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(plugin_path), "PREFECT_API_URL": prefect_harness}


def reelflow(env: dict, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reelflow.flows.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def write_image(path: Path, colour: tuple[int, int, int]) -> Path:
    Image.new("RGB", (16, 16), colour).save(path)
    return path


def test_its_stages_are_listed_with_slots_kinds_and_sources(env: dict) -> None:
    done = reelflow(env, "stages")
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line and not line.startswith(" ")}
    assert "tint_frames" in lines and "invert_latents:toy" in lines and "invert_latents:fatezero" in lines
    assert "package toy" in lines["tint_frames"]
    assert "frames <- video_frames|frames" in done.stdout and "reference: image" in done.stdout
    assert "-> inversion/toy" in lines["invert_latents:toy"]


def test_its_preset_runs_end_to_end_with_a_named_source(env: dict, clip: Path, tmp_path: Path) -> None:
    reference = write_image(tmp_path / "ref.png", (255, 0, 0))
    store, output = tmp_path / "store", tmp_path / "out"
    argv = ["run", "toy-tint", "--input", str(clip), "--source", f"reference={reference}", "--store", str(store),
            "--output", str(output)]  # fmt: skip
    done = reelflow(env, *argv)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((output / "clip.toy-tint.manifest.json").read_text())
    assert manifest["status"] == "completed" and (output / "clip.toy-tint.mp4").stat().st_size > 0
    assert manifest["sources"]["reference"]["url"] == str(reference)
    tinted = ArtifactStore(str(store)).open("tint_frames", next(s["key"] for s in manifest["stages"] if s["name"] == "tint_frames"))
    frames = tinted["frames"][:]
    assert frames.shape == (10, 64, 64, 3) and frames[..., 0].mean() > frames[..., 2].mean() + 40, "tinted red"
    assert tinted.attrs["windows"]["count"] == 3 and tinted.attrs["provenance"]["resumed_parts"] == []
    assert tinted.attrs["provenance"]["inputs"]["source:reference"]["kind"] == "image"

    # The source's bytes are in the key: another reference recomputes the tint, not the decode.
    write_image(reference, (0, 0, 255))
    assert reelflow(env, *argv).returncode == 0
    again = json.loads((output / "clip.toy-tint.manifest.json").read_text())
    assert {s["name"]: s["status"] for s in again["stages"]} == {
        "decode_video": "cached", "tint_frames": "computed", "encode_video": "computed", "compute_metrics": "computed"}


def test_a_missing_source_fails_before_anything_runs(env: dict, clip: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    done = reelflow(env, "run", "toy-tint", "--input", str(clip), "--store", str(store), "--output", str(tmp_path))
    assert done.returncode == 1
    assert f"image source 'reference' '{tmp_path}" not in done.stderr  # the sidecar is beside the clip
    assert "image source 'reference'" in done.stderr and "clip.ref.png' does not exist" in done.stderr
    assert "--source reference=PATH" in done.stderr and not store.exists()


def test_wiring_a_fatezero_edit_to_the_toy_inversion_is_refused_naming_both(env: dict, tmp_path: Path) -> None:
    spec = {
        "name": "mixed", "models": {"sd": {"id": "unused"}},
        "stages": [
            {"stage": "decode_video"}, {"stage": "encode_latents"},
            {"stage": "invert_latents", "method": "toy", "inputs": {"latents": "encode_latents"}},
            {"stage": "denoise_latents", "method": "fatezero", "inputs": {"inversion": "invert_latents"},
             "params": {"target_prompt": "a dog"}},
        ],
    }  # fmt: skip
    path = tmp_path / "mixed.yaml"
    path.write_text(json.dumps(spec))
    done = reelflow(env, "run", str(path), "--input", "clip.mp4", "--store", str(tmp_path / "store"))
    assert done.returncode == 1 and not (tmp_path / "store").exists()
    assert ("'denoise_latents' (denoise_latents:fatezero) input 'inversion' needs inversion/ddim-attention, "
            "but 'invert_latents' (invert_latents:toy) produces inversion/toy") in done.stderr


def test_its_tiny_builder_is_offered_by_models_tiny(env: dict, tmp_path: Path) -> None:
    done = reelflow(env, "models", "tiny", str(tmp_path / "toy-sd"), "--kind", "toy-sd")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "toy-sd" / "model_index.json").is_file()


# A child that runs the toy preset and hangs once two windows of tint_frames are stored.
CHILD = """
import pathlib, sys, time
import reelflow_toy.stages as toy

real, count = toy.tint, []

def tint_then_hang(frames, colour, strength):
    if len(count) == 2:
        pathlib.Path(sys.argv[2]).write_text("two windows stored")
        time.sleep(600)
    count.append(1)
    return real(frames, colour, strength)

toy.tint = tint_then_hang
from reelflow.flows.edit import edit_video
from reelflow.schemas.pipeline import PipelineSpec
edit_video(PipelineSpec.model_validate_json(pathlib.Path(sys.argv[1]).read_text()))
"""


def test_a_windowed_stage_killed_mid_clip_computes_only_the_missing_windows(
    env: dict, clip: Path, tmp_path: Path
) -> None:
    reference = write_image(tmp_path / "ref.png", (0, 200, 0))
    args = ["--input", str(clip), "--source", f"reference={reference}", "--set", "stages.decode_video.params.num_frames=12"]
    # The toy stages are not declared in this process (the package is installed for the children only),
    # so the child gets the preset's YAML with the overrides applied, and validates it itself.
    raw = yaml.safe_load((PLUGIN / "reelflow_toy" / "presets" / "toy-tint.yaml").read_text())
    for override in (f"input={clip}", f"sources.reference.path={reference}", f"store={tmp_path / 'store'}",
                     f"output={tmp_path / 'out'}", "stages.decode_video.params.num_frames=12"):  # fmt: skip
        raw = apply_override(raw, override)
    spec_file, marker = tmp_path / "spec.json", tmp_path / "hanging"
    spec_file.write_text(json.dumps(raw))
    with (tmp_path / "child.log").open("w") as log:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(spec_file), str(marker)], env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline, (tmp_path / "child.log").read_text()[-3000:]
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()

    done = reelflow(env, "run", "toy-tint", *args, "--store", str(tmp_path / "store"), "--output", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "out" / "clip.toy-tint.manifest.json").read_text())
    key = next(s["key"] for s in manifest["stages"] if s["name"] == "tint_frames")
    resumed = ArtifactStore(str(tmp_path / "store")).open("tint_frames", key)
    assert resumed.attrs["provenance"]["resumed_parts"] == ["window-0", "window-1"]
    assert resumed.attrs["windows"]["computed"] == [2, 3]
    assert "window_tails" not in resumed

    clean = reelflow(env, "run", "toy-tint", *args, "--store", str(tmp_path / "clean"), "--output", str(tmp_path / "clean-out"))
    assert clean.returncode == 0, clean.stderr
    fresh = ArtifactStore(str(tmp_path / "clean")).open("tint_frames", key)
    np.testing.assert_array_equal(resumed["frames"][:], fresh["frames"][:])


def test_bulk_sidecars_each_clip_has_its_own_and_an_edited_one_recomputes_that_clip_only(
    env: dict, clip: Path, tmp_path: Path
) -> None:
    library = tmp_path / "library"
    library.mkdir()
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        shutil.copy(clip, library / f"{name}.mp4")
        write_image(library / f"{name}.ref.png", colour)
    shutil.copy(clip, library / "c.mp4")  # no sidecar: fails alone
    argv = ["bulk", str(library / "*.mp4"), "toy-tint", "--store", str(tmp_path / "store"), "--output", str(tmp_path / "out")]

    first = reelflow(env, *argv)
    assert first.returncode == 1 and "1 of 3 clips failed: c.mp4" in first.stderr
    report = json.loads((tmp_path / "out" / "toy-tint.bulk.json").read_text())
    rows = {Path(c["clip"]).stem: c for c in report["clips"]}
    assert rows["a"]["status"] == rows["b"]["status"] == "completed"
    assert rows["c"]["status"] == "failed" and "c.ref.png' does not exist" in rows["c"]["error"]

    write_image(library / "b.ref.png", (0, 255, 0))
    (library / "c.mp4").unlink()
    second = reelflow(env, *argv)
    assert second.returncode == 0, second.stderr
    rows = {Path(c["clip"]).stem: c for c in json.loads((tmp_path / "out" / "toy-tint.bulk.json").read_text())["clips"]}
    assert rows["a"]["status"] == "exists" and rows["a"]["computed"] == []
    assert rows["b"]["status"] == "completed"
    assert rows["b"]["cached"] == ["decode_video"]
    assert sorted(rows["b"]["computed"]) == ["compute_metrics", "encode_video", "tint_frames"]


def test_a_library_manifest_gives_each_clip_its_sources_and_overrides(env: dict, clip: Path, tmp_path: Path) -> None:
    library = tmp_path / "library"
    (library / "refs").mkdir(parents=True)
    shutil.copy(clip, library / "a.mp4")
    write_image(library / "refs" / "warm.png", (250, 120, 0))
    manifest = library / "clips.json"
    manifest.write_text(json.dumps([
        {"video": "a.mp4", "reference": "refs/warm.png", "overrides": ["stages.tint_frames.params.strength=0.25"]},
    ]))  # fmt: skip
    done = reelflow(env, "bulk", str(manifest), "toy-tint", "--store", str(tmp_path / "store"), "--output", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    edit = json.loads((tmp_path / "out" / "a.toy-tint.manifest.json").read_text())
    assert edit["sources"]["reference"]["url"] == str(library / "refs" / "warm.png")
    assert next(s for s in edit["spec"]["stages"] if s["stage"] == "tint_frames")["params"]["strength"] == 0.25


def test_the_demo_runs_its_preset_with_a_synthetic_reference_image(env: dict, tmp_path: Path) -> None:
    done = reelflow(env, "demo", "--workdir", str(tmp_path / "demo"), "--preset", "toy-tint")
    assert done.returncode == 0, done.stderr
    assert "toy-tint: completed" in done.stdout and (tmp_path / "demo" / "sources" / "reference.png").is_file()
    assert (tmp_path / "demo" / "output" / "source.toy-tint.mp4").is_file()
