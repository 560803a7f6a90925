"""A run killed with SIGKILL in the middle of a stage resumes from the stages that finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from reelflow.flows.edit import edit_video
from reelflow.storage.leases import Leases
from reelflow.storage.store import ArtifactStore

pytestmark = pytest.mark.flow

# Runs the flow in a child process whose VAE decoding writes its first chunk, says so, and hangs.
CHILD = """
import pathlib, sys, time
import torch
import reelflow.tasks.vae

torch.set_num_threads(1)  # as the test process, so both compute bit-identical results

real_decode = reelflow.tasks.vae.vae_decode

def decode_then_hang(vae, latents, *, chunk_size, on_chunk):
    def first_chunk_then_hang(start, stop, chunk):
        on_chunk(start, stop, chunk)
        pathlib.Path(sys.argv[2]).write_text("one chunk written")
        time.sleep(600)
    return real_decode(vae, latents, chunk_size=chunk_size, on_chunk=first_chunk_then_hang)

reelflow.tasks.vae.vae_decode = decode_then_hang

from reelflow.flows.edit import edit_video
from reelflow.schemas.pipeline import PipelineSpec
edit_video(PipelineSpec.model_validate_json(pathlib.Path(sys.argv[1]).read_text()))
"""


def kill_when_hanging(script: str, spec, tmp_path: Path, api_url: str, where: str) -> None:
    """Run ``spec`` in a child running ``script``, which writes a marker and hangs at ``where``; SIGKILL it there."""
    spec_file, marker, log = tmp_path / "spec.json", tmp_path / "hanging", tmp_path / "child.log"
    spec_file.write_text(spec.model_dump_json())
    env = {**os.environ, "PREFECT_API_URL": api_url}
    with log.open("w") as out:
        child = subprocess.Popen([sys.executable, "-c", script, str(spec_file), str(marker)], env=env, stdout=out, stderr=out)
        deadline = time.monotonic() + 240
        while not marker.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                pytest.fail(f"the child never reached {where}:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()


def test_sigkill_mid_stage_then_rerun_recomputes_only_from_that_stage(
    make_spec, prefect_harness: str, tmp_path: Path
) -> None:
    spec = make_spec()
    kill_when_hanging(CHILD, spec, tmp_path, prefect_harness, "decode_latents")

    store = ArtifactStore(spec.store)
    complete = {i.stage for i in store.list() if i.complete}
    assert complete == {"decode_video", "encode_latents"}
    assert len(store.temporaries()) == 1, "the killed attempt's partial write is still there"
    killed_key = store.temporaries()[0][0].rsplit("/", 1)[1].split(".zarr")[0]
    assert Leases(store).read(killed_key) is not None, "and so is its lease"

    manifest = edit_video(spec)
    assert {r.name: r.status for r in manifest.stages} == {
        "decode_video": "cached",
        "encode_latents": "cached",
        "decode_latents": "computed",
        "encode_video": "computed",
        "compute_metrics": "computed",
    }
    assert manifest.stages[2].key == killed_key
    assert Leases(store).read(killed_key) is None, "the dead run's lease was taken over and released"

    # Nothing from the killed attempt leaked in: the result equals a clean run in a fresh store.
    clean = edit_video(make_spec(f"store={tmp_path / 'clean-store'}", f"output={tmp_path / 'clean-out'}"))
    resumed = store.open("decode_latents", killed_key)["frames"][:]
    fresh = ArtifactStore(clean.store).open("decode_latents", clean.stages[2].key)["frames"][:]
    np.testing.assert_array_equal(resumed, fresh)


# The FateZero inversion in a child that hangs once step 2 of 6 is stored with its attention maps
# (it waits a second before step 2's callback, so the background writer has stored the maps of 0-2).
INVERT_CHILD = """
import pathlib, sys, time
import torch
import reelflow.tasks.fatezero as fz

torch.set_num_threads(1)
real = fz.fatezero_invert

def invert_then_hang(*args, on_step, **kwargs):
    def step_then_hang(k, t, z):
        if k == 2:
            time.sleep(1.0)
        on_step(k, t, z)
        if k == 2:
            pathlib.Path(sys.argv[2]).write_text("three steps stored")
            time.sleep(600)
    return real(*args, on_step=step_then_hang, **kwargs)

fz.fatezero_invert = invert_then_hang
from reelflow.flows.edit import edit_video
from reelflow.schemas.pipeline import PipelineSpec
edit_video(PipelineSpec.model_validate_json(pathlib.Path(sys.argv[1]).read_text()))
"""


def test_an_inversion_killed_mid_way_resumes_from_its_last_stored_step(
    tiny_bundle: Path, clip: Path, prefect_harness: str, tmp_path: Path
) -> None:
    from reelflow.deployments import spec_path
    from reelflow.schemas.loading import load_spec

    def spec(store: str):
        return load_spec(spec_path("fatezero-style"), [
            f"models.sd.id={tiny_bundle}", f"input={clip}", f"store={tmp_path / store}", f"output={tmp_path / store}-out",
            "stages.decode_video.params.num_frames=3", "stages.decode_video.params.width=64",
            "stages.decode_video.params.height=64", "stages.decode_video.params.multiple=8",
            "stages.invert_latents.params.num_steps=6", "stages.invert_latents.params.min_channels=0",
            "stages.invert_latents.params.source_prompt=a cat", "stages.denoise_latents.each=[{}]",
            "stages.denoise_latents.params={target_prompt: a dog, reweight: {}}", "stages.encode_video.params.preset=ultrafast",
        ])  # fmt: skip

    killed = spec("store")
    kill_when_hanging(INVERT_CHILD, killed, tmp_path, prefect_harness, "inversion step 2")

    resumed = edit_video(killed)
    key = next(r.key for r in resumed.stages if r.name == "invert_latents")
    assert {r.name: r.status for r in resumed.stages}["invert_latents"] == "computed"
    inversion = ArtifactStore(resumed.store).open("invert_latents", key)
    assert inversion.attrs["provenance"]["resumed_parts"] == ["step-0", "step-1", "step-2"]
    assert inversion.attrs["attention_store"]["resumed_from_step"] == 3

    clean = edit_video(spec("clean"))
    fresh = ArtifactStore(clean.store).open("invert_latents", key)
    np.testing.assert_array_equal(inversion["latents"][:], fresh["latents"][:])
    for group in ("attention", "queries", "keys"):  # cross maps, self-attention queries and key-frame keys
        assert sorted(inversion[group].array_keys()) == sorted(fresh[group].array_keys()) != []
        for name in fresh[group].array_keys():
            np.testing.assert_array_equal(inversion[group][name][:], fresh[group][name][:], err_msg=f"{group}/{name}")
    assert inversion.attrs["layers"] == fresh.attrs["layers"]
