"""The method seam end to end on tiny models: FateZero's outputs survive the move, models by role and
named sources enter the keys of exactly the stages that use them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from reelflow.deployments import spec_path
from reelflow.flows.dag import plan_run
from reelflow.flows.edit import edit_video
from reelflow.flows.sources import hash_sources, source_urls
from reelflow.schemas.calls import StoreSpec
from reelflow.schemas.loading import load_spec
from reelflow.schemas.settings import Settings
from reelflow.storage.store import ArtifactStore
from tests.flows.conftest import FATEZERO_TINY

pytestmark = pytest.mark.flow
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "fatezero_tiny_cpu.npz"
# The two edits the golden latents were recorded with (tests/golden, before the seam existed).
EDITS = (
    "stages.denoise_latents.each=[{target_prompt: a painting of a cat walking on a street, reweight: {painting: 10}},"
    " {target_prompt: a dog walking on a street, blend_words: [[cat], [dog]], blend_latents: true, replace: true,"
    " reweight: {}}]"
)


def fatezero(bundle: Path, clip: Path, tmp_path: Path, *overrides: str):
    paths = (f"models.sd.id={bundle}", f"input={clip}", f"store={tmp_path / 'store'}", f"output={tmp_path / 'out'}")
    return load_spec(spec_path("fatezero-style"), [*paths, *FATEZERO_TINY, *overrides])


def keys(spec) -> dict[str, str]:
    settings = Settings()
    sources = hash_sources(spec, source_urls(spec), settings)
    planned = plan_run(spec, sources=sources, store=StoreSpec(url=str(spec.store)), run_id="", default_dtype="float32")
    return {p.id: p.key for p in planned}


def test_fatezero_edits_equal_the_golden_latents_recorded_before_the_seam(
    tiny_bundle: Path, clip: Path, tmp_path: Path
) -> None:
    """The golden latents came from the maps path (self-attention as stored probabilities). Since
    self-attention is replayed from queries and keys through scaled_dot_product_attention, the edits
    agree with them to float16 storage rounding (the algebra is checked exactly, in float64, in
    tests/core/test_fatezero_tokens.py), and the float32 inversion to 1e-4 (CPUs differ in the last bits: AVX2
    and AVX-512 kernels sum in other orders, 3e-5 apart after the inversion's steps)."""
    manifest = edit_video(fatezero(tiny_bundle, clip, tmp_path, EDITS))
    store, golden = ArtifactStore(manifest.store), np.load(GOLDEN)
    stages = {r.name: r for r in manifest.stages}
    for name in ("denoise_latents_0", "denoise_latents_1"):
        edited = store.open("denoise_latents", stages[name].key)["latents"][:].astype(np.float32)
        np.testing.assert_allclose(edited, golden[name].astype(np.float32), rtol=1e-3, atol=1e-3, err_msg=name)
    inverted = store.open("invert_latents", stages["invert_latents"].key)["latents"][-1]
    np.testing.assert_allclose(inverted, golden["inversion_zT"], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from reelflow.core.tiny import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("models") / "tiny-sd-seed1", seed=1)


def test_each_model_role_enters_the_key_and_changing_one_recomputes_its_stages_only(
    tiny_bundle: Path, other_bundle: Path, clip: Path, tmp_path: Path
) -> None:
    two = (f"models.text={{id: {other_bundle}}}", "stages.encode_latents.model=sd", "stages.decode_latents.model=sd",
           "stages.invert_latents.models={unet: sd, text_encoder: text}",
           "stages.denoise_latents.models={unet: sd, text_encoder: text}", "stages.denoise_latents.each=[{}]")  # fmt: skip
    one = fatezero(tiny_bundle, clip, tmp_path, *two)
    swapped = fatezero(tiny_bundle, clip, tmp_path, *two, f"models.text.id={tiny_bundle}")
    before, after = keys(one), keys(swapped)
    changed = {stage for stage in before if before[stage] != after[stage]}
    assert changed == {"invert_latents", "denoise_latents_0", "decode_latents_0", "encode_video_0", "compute_metrics_0"}

    edit_video(one)
    rerun = edit_video(swapped)
    status = {r.name: r.status for r in rerun.stages}
    assert {s for s, v in status.items() if v == "computed"} == changed
    assert status["decode_video"] == status["encode_latents"] == "cached"


def test_a_named_sources_bytes_enter_the_keys_of_the_stages_that_read_it(
    tiny_bundle: Path, clip: Path, tmp_path: Path
) -> None:
    alternate = tmp_path / "alternate.mp4"
    shutil.copy(clip, alternate)
    reading = ("sources.alt={kind: video, path: %s}" % alternate, "stages.decode_video.sources={video: alt}")
    spec = load_spec(spec_path("reconstruct"), [f"models.sd.id={tiny_bundle}", f"input={clip}",
                                                 f"store={tmp_path / 'store'}", *reading])  # fmt: skip
    before = keys(spec)
    with alternate.open("ab") as handle:
        handle.write(b"\0")  # same video, other bytes
    after = keys(spec)
    assert {stage for stage in before if before[stage] != after[stage]} == set(before), "every stage reads it, through decode_video"
    shutil.copy(clip, alternate)
    assert keys(spec) == before
    clip_moved = tmp_path / "moved.mp4"
    shutil.copy(clip, clip_moved)
    assert keys(spec.model_copy(update={"input": str(clip_moved)})) == before, "the video is not read by any stage here"


def test_a_pipeline_that_reads_another_video_than_its_input_runs_and_is_named_after_the_input(
    tiny_bundle: Path, clip: Path, tmp_path: Path
) -> None:
    alternate = tmp_path / "alternate.mp4"
    shutil.copy(clip, alternate)
    spec = load_spec(spec_path("reconstruct"), [
        f"models.sd.id={tiny_bundle}", f"input={clip}", f"store={tmp_path / 'store'}", f"output={tmp_path / 'out'}",
        f"sources.alt={{kind: video, path: {alternate}}}", "stages.decode_video.sources={video: alt}",
        "stages.decode_video.params.num_frames=3", "stages.decode_video.params.width=64",
        "stages.decode_video.params.height=64", "stages.decode_video.params.multiple=8",
        "stages.encode_video.params.preset=ultrafast"])  # fmt: skip
    manifest = edit_video(spec)
    assert manifest.status == "completed" and Path(manifest.outputs["encode_video"]).name == "clip.reconstruct.mp4"
    assert manifest.sources["alt"].url == str(alternate)
