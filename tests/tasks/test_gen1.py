"""Gen-1 style stages on tiny models: depth reused across a sweep, the structure level as stored, the guards."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from reelflow.core.guidance.structure import laplacian_energy
from reelflow.core.tiny_depth import build_tiny_depth_anything
from reelflow.core.tiny_gen1 import build_tiny_controlnet, build_tiny_sd_depth
from reelflow.deployments import spec_path
from reelflow.flows.dag import plan_run
from reelflow.flows.edit import prepare_run
from reelflow.schemas.calls import SourceRef, StoreSpec
from reelflow.schemas.errors import SpecError
from reelflow.schemas.loading import load_spec
from reelflow.schemas.settings import Settings
from reelflow.storage.keys import content_key
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import task_for

SMALL = ("stages.decode_video.params.num_frames=6", "stages.decode_video.params.width=64",
         "stages.decode_video.params.height=64", "stages.decode_video.params.multiple=8",
         "stages.denoise_latents.params.num_steps=5", "stages.denoise_latents.params.window=4",
         "stages.denoise_latents.params.overlap=1")  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen1-models")
    return {"sd": tiny_bundle, "sd_depth": build_tiny_sd_depth(root / "sd-depth"),
            "controlnet": build_tiny_controlnet(root / "controlnet"), "depth": build_tiny_depth_anything(root / "depth")}  # fmt: skip


def spec(preset: str, models: dict[str, Path], *extra: str):
    ids = [f"models.{name}.id={path}" for name, path in models.items() if name in _names(preset)]
    return load_spec(spec_path(preset), [*ids, *SMALL, *extra])


def _names(preset: str) -> set[str]:
    return set(load_spec(spec_path(preset)).models)


def planned(spec_, clip: Path, store: str) -> dict:
    source = SourceRef(url=str(clip), key=content_key(fsspec.filesystem("file"), str(clip)))
    stages = plan_run(spec_, sources={"video": source}, store=StoreSpec(url=store), run_id="r", default_dtype="float32")
    return {p.id: p for p in stages}


def run(stages: dict) -> dict:
    return {sid: task_for(p.call.stage).fn(call=p.call) for sid, p in stages.items()}


def test_a_sweep_of_t_s_reuses_the_depth_and_stores_each_structure_level(models, clip: Path, tmp_path: Path) -> None:
    sweep = "stages.denoise_latents.each=[{t_s: 0}, {t_s: 3}]"
    stages = planned(spec("gen1-controlnet", models, sweep), clip, str(tmp_path / "store"))
    refs = run(stages)
    store = ArtifactStore(str(tmp_path / "store"))
    assert stages["denoise_latents_0"].call.inputs["depth"].key == stages["denoise_latents_1"].call.inputs["depth"].key
    assert stages["denoise_latents_0"].key != stages["denoise_latents_1"].key
    depth = torch.from_numpy(np.asarray(store.open("estimate_depth", refs["estimate_depth"].key)["depth"][:], np.float32))
    level = [torch.from_numpy(np.asarray(store.open("denoise_latents", refs[f"denoise_latents_{i}"].key)["structure"][:],
                                         np.float32)) for i in (0, 1)]  # fmt: skip
    torch.testing.assert_close(level[0], depth, atol=1e-3, rtol=0)  # t_s = 0: the depth itself
    assert (laplacian_energy(level[1]) < 0.5 * laplacian_energy(level[0])).all()
    latents = store.open("denoise_latents", refs["denoise_latents_0"].key)
    assert latents["latents"].shape == (6, 4, 8, 8) and latents.attrs["windows"]["count"] == 2
    assert not np.allclose(latents["latents"][:], store.open("denoise_latents", refs["denoise_latents_1"].key)["latents"][:])


def test_the_depth_unet_method_runs_the_concat_path(models, clip: Path, tmp_path: Path) -> None:
    refs = run(planned(spec("gen1-depth2img", models), clip, str(tmp_path / "store")))
    edited = ArtifactStore(str(tmp_path / "store")).open("denoise_latents", refs["denoise_latents"].key)
    assert edited["latents"].shape == (6, 4, 8, 8) and np.isfinite(edited["latents"][:]).all()


def test_a_four_channel_unet_is_refused_for_the_concat_method(models, clip: Path, tmp_path: Path) -> None:
    given = spec("gen1-depth2img", {**models, "sd_depth": models["sd"]}, f"input={clip}", f"store={tmp_path / 's'}")
    with pytest.raises(SpecError, match="needs 5 input channels .* use method gen1_controlnet"):
        prepare_run(given, Settings())
