"""Each stage task's body (``task.fn``) against a temporary store, with the tiny bundle and a synthetic clip."""

from __future__ import annotations

import io
import threading
import time
from fractions import Fraction
from pathlib import Path

import fsspec
import numpy as np
import pytest

from reelflow.core.video import probe_video
from reelflow.deployments import spec_path
from reelflow.flows.dag import plan_run
from reelflow.schemas.calls import SourceRef, StoreSpec
from reelflow.schemas.errors import ArtifactNotFound, InputVideoError
from reelflow.schemas.loading import load_spec
from reelflow.storage.keys import content_key
from reelflow.storage.leases import Leases
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import TASKS, task_for


def plan(clip: Path, bundle: Path, store_url: str, *overrides: str, run_id: str = "run-1") -> dict:
    spec = load_spec(
        spec_path("reconstruct"),
        [
            f"models.sd.id={bundle}",
            "stages.decode_video.params.num_frames=6",
            "stages.decode_video.params.width=64",
            "stages.decode_video.params.height=64",
            "stages.decode_video.params.multiple=8",
            *overrides,
        ],
    )
    fs = fsspec.filesystem("file")
    source = SourceRef(url=str(clip), key=content_key(fs, str(clip)))
    planned = plan_run(spec, sources={"video": source}, store=StoreSpec(url=store_url), run_id=run_id, default_dtype="float32")
    return {p.id: p for p in planned}


def run_all(stages: dict) -> dict:
    return {sid: task_for(p.call.stage).fn(call=p.call) for sid, p in stages.items()}


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return str(tmp_path / "store")


def test_reconstruct_stages_write_what_they_declare(clip: Path, tiny_bundle: Path, store_url: str) -> None:
    stages = plan(clip, tiny_bundle, store_url)
    refs = run_all(stages)
    store = ArtifactStore(store_url)

    decoded = store.open("decode_video", refs["decode_video"].key)
    assert decoded["frames"].shape == (6, 64, 64, 3) and decoded["frames"].dtype == np.uint8
    assert list(decoded["frame_index"][:]) == list(range(6))
    assert Fraction(decoded.attrs["fps"]) == 24
    assert decoded["audio"].dtype == np.float32 and decoded.attrs["sample_rate"] > 0
    # The audio of the span [0, 6/24) s is trimmed to it.
    assert decoded["audio"].shape[1] == pytest.approx(decoded.attrs["sample_rate"] * 6 / 24, abs=2)

    latents = store.open("encode_latents", refs["encode_latents"].key)["latents"]
    assert latents.shape == (6, 4, 8, 8) and latents.dtype == np.float16
    assert tuple(latents.metadata.dimension_names) == ("frame", "latent_channel", "y", "x")

    frames = store.open("decode_latents", refs["decode_latents"].key)["frames"]
    assert frames.shape == (6, 64, 64, 3)

    video = store.open("encode_video", refs["encode_video"].key)
    info = probe_video(io.BytesIO(bytes(video["mp4"][:])))
    assert (info.width, info.height, info.num_frames, info.fps) == (64, 64, 6, 24)
    assert info.has_audio

    metrics = store.open("compute_metrics", refs["compute_metrics"].key)
    assert metrics["psnr"].shape == (6,) and metrics["ssim"].shape == (6,)
    assert metrics.attrs["metrics"]["psnr"] == pytest.approx(float(metrics["psnr"][:].mean()), rel=1e-5)


def test_provenance_names_params_inputs_model_and_libraries(clip: Path, tiny_bundle: Path, store_url: str) -> None:
    stages = plan(clip, tiny_bundle, store_url)
    refs = run_all(stages)
    prov = ArtifactStore(store_url).open("encode_latents", refs["encode_latents"].key).attrs["provenance"]
    assert prov["stage"] == "encode_latents" and prov["key"] == refs["encode_latents"].key
    assert prov["params"] == {"chunk_size": 8, "sample": False}
    assert prov["inputs"]["frames"]["key"] == refs["decode_video"].key
    assert prov["models"]["vae"]["id"] == str(tiny_bundle) and prov["models"]["vae"]["fingerprint"].startswith("local:")
    assert {"torch", "diffusers", "zarr", "prefect"} <= set(prov["libraries"])
    assert prov["run_id"] == "run-1"


def test_metrics_of_identical_frames_are_perfect(clip: Path, tiny_bundle: Path, store_url: str) -> None:
    stages = plan(clip, tiny_bundle, store_url, "stages.compute_metrics.inputs.edited=decode_video")
    refs = run_all(stages)
    attrs = ArtifactStore(store_url).open("compute_metrics", refs["compute_metrics"].key).attrs
    assert attrs["metrics"] == {"psnr": 100.0, "ssim": 1.0}


def test_a_complete_artifact_is_returned_without_recomputing(clip: Path, tiny_bundle: Path, store_url: str) -> None:
    first = run_all(plan(clip, tiny_bundle, store_url, run_id="first"))
    second = run_all(plan(clip, tiny_bundle, store_url, run_id="second"))
    assert {s: r.run_id for s, r in second.items()} == {s: "first" for s in first}


def test_sampled_latents_follow_the_seed(clip: Path, tiny_bundle: Path, store_url: str) -> None:
    store = ArtifactStore(store_url)
    keys = {}
    for seed in (0, 0, 1):
        stages = plan(clip, tiny_bundle, store_url, "stages.encode_latents.params.sample=true", f"seed={seed}")
        refs = run_all({s: stages[s] for s in ("decode_video", "encode_latents")})
        keys.setdefault(seed, refs["encode_latents"].key)
        assert refs["encode_latents"].key == keys[seed]
    a = store.open("encode_latents", keys[0])["latents"][:]
    b = store.open("encode_latents", keys[1])["latents"][:]
    assert not np.array_equal(a, b)
    mode = plan(clip, tiny_bundle, store_url)
    assert mode["encode_latents"].key not in keys.values()
    assert plan(clip, tiny_bundle, store_url, "seed=5")["encode_latents"].key == mode["encode_latents"].key


def test_missing_input_artifact_is_a_clear_error(clip: Path, tiny_bundle: Path, store_url: str) -> None:
    stages = plan(clip, tiny_bundle, store_url)
    with pytest.raises(ArtifactNotFound, match="no artifact"):
        TASKS[("encode_latents", None)].fn(call=stages["encode_latents"].call)
    assert list(ArtifactStore(store_url).list()) == []


def test_truncated_video_fails_decode_without_a_complete_artifact(
    clip: Path, tiny_bundle: Path, store_url: str, tmp_path: Path
) -> None:
    cut = tmp_path / "cut.mp4"
    data = clip.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    stages = plan(cut, tiny_bundle, store_url, "stages.decode_video.params.num_frames=24")
    with pytest.raises(InputVideoError):
        TASKS[("decode_video", None)].fn(call=stages["decode_video"].call)
    store = ArtifactStore(store_url)
    assert [i for i in store.list() if i.complete] == [] and store.temporaries() == []


def test_a_stage_waits_for_another_runs_lease(clip: Path, tiny_bundle: Path, store_url: str) -> None:
    call = plan(clip, tiny_bundle, store_url)["decode_video"].call
    store = ArtifactStore(store_url)
    leases = Leases(store)
    assert leases.acquire(call.key, "other-run", ttl=30)

    def other_run_publishes() -> None:
        time.sleep(0.8)
        with store.write("decode_video", call.key, {"provenance": {"run_id": "other"}}) as writer:
            writer.write_array("frames", np.zeros((6, 64, 64, 3), np.uint8), dims=("frame", "y", "x", "rgb"))
        leases.release(call.key, "other-run")

    thread = threading.Thread(target=other_run_publishes)
    thread.start()
    ref = TASKS[("decode_video", None)].fn(call=call)
    thread.join()
    assert ref.run_id == "other", "the waiting run must return the other run's artifact, not compute its own"


def test_a_role_filled_by_a_standalone_model_loads_that_model(clip: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """A VAE published on its own (no model_index.json) fills the vae role of a bundle's pipeline."""
    import shutil

    standalone = shutil.copytree(tiny_bundle / "vae", tmp_path / "vae-alone")
    roles = (f"models.vae={{id: {standalone}}}", "stages.encode_latents.models={vae: vae}",
             "stages.decode_latents.models={vae: vae}")  # fmt: skip
    alone = plan(clip, tiny_bundle, str(tmp_path / "alone"), *roles)
    assert alone["encode_latents"].call.models["vae"].bundle is False
    assert plan(clip, tiny_bundle, str(tmp_path / "bundle"))["encode_latents"].call.models["vae"].bundle is True
    refs = run_all({k: alone[k] for k in ("decode_video", "encode_latents")})
    bundled = plan(clip, tiny_bundle, str(tmp_path / "bundle"))
    reference = run_all({k: bundled[k] for k in ("decode_video", "encode_latents")})
    latents = ArtifactStore(str(tmp_path / "alone")).open("encode_latents", refs["encode_latents"].key)["latents"][:]
    expected = ArtifactStore(str(tmp_path / "bundle")).open("encode_latents", reference["encode_latents"].key)["latents"][:]
    np.testing.assert_array_equal(latents, expected)
    assert refs["encode_latents"].key != reference["encode_latents"].key, "another model, another key"
