"""Preflight checks: previews agree with what the stages write, refusals name the stage, model configs
are read without loading weights, and all of it happens in prepare_run before any stage runs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest

from reelflow.core.models import FAMILIES
from reelflow.deployments import spec_path
from reelflow.flows.dag import PlannedStage, plan_run
from reelflow.flows.edit import prepare_run
from reelflow.schemas.calls import SourceRef, StoreSpec
from reelflow.schemas.errors import InputVideoError, RegistryError, SpecError
from reelflow.schemas.loading import load_spec
from reelflow.schemas.settings import Settings
from reelflow.storage.keys import content_key
from reelflow.storage.store import ArtifactStore
import reelflow.tasks.preflight as preflight_module
from reelflow.tasks import task_for
from reelflow.tasks.preflight import CHECKS, FramesPreview, PreflightContext, preflight, stage_check


def plan(preset: str, clip: Path, bundle: Path, store_url: str, *overrides: str) -> list[PlannedStage]:
    spec = load_spec(spec_path(preset), [f"models.sd.id={bundle}", "stages.decode_video.params.multiple=8", *overrides])
    source = SourceRef(url=str(clip), key=content_key(fsspec.filesystem("file"), str(clip)))
    store = StoreSpec(url=store_url)
    return plan_run(spec, sources={"video": source}, store=store, run_id="r", default_dtype="float32")


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def temporary_check() -> Iterator[Callable[..., Callable]]:
    """``temporary_check(stage, method)`` registers a check for this test only; the registry is restored after."""
    saved = dict(CHECKS)
    yield stage_check
    CHECKS.clear()
    CHECKS.update(saved)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # the clip is 96x64 at 24 fps for 1 s
        (("num_frames=6", "width=64", "height=64"), FramesPreview(6, 64, 64, 96, 64, "crop", has_audio=True, source_frames=24)),
        (("start=0.5", "stride=3", "width=48"), FramesPreview(4, 32, 48, 96, 64, "crop", has_audio=True, source_frames=24)),
        (("num_frames=5", "width=64", "height=64", "fit=pad"), FramesPreview(5, 64, 64, 96, 64, "pad", has_audio=True, source_frames=24)),
    ],
)
def test_the_decode_video_preview_is_what_its_body_writes(
    clip: Path, tiny_bundle: Path, store_url: str, params: tuple[str, ...], expected: FramesPreview
) -> None:
    planned = plan("reconstruct", clip, tiny_bundle, store_url, *(f"stages.decode_video.params.{p}" for p in params))
    previews = preflight(planned, Settings())
    assert previews["decode_video"] == expected
    decode = next(p for p in planned if p.id == "decode_video")
    ref = task_for(decode.call.stage).fn(call=decode.call)
    decoded = ArtifactStore(store_url).open(ref.stage, ref.key)
    assert decoded["frames"].shape[:3] == (expected.count, expected.height, expected.width)
    assert ("audio" in decoded) == expected.has_audio


def test_stages_without_a_check_keep_their_inputs_frames(clip: Path, tiny_bundle: Path, store_url: str) -> None:
    planned = plan("reconstruct", clip, tiny_bundle, store_url, "stages.decode_video.params.num_frames=7")
    previews = preflight(planned, Settings())
    decoded = previews["decode_video"]
    assert decoded is not None and decoded.count == 7
    assert previews["encode_latents"] == previews["decode_latents"] == previews["encode_video"] == decoded


def test_sources_are_probed_once_and_only_when_a_check_asks(
    clip: Path, tiny_bundle: Path, store_url: str, temporary_check, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes: list[object] = []
    probe = preflight_module.probe_video
    monkeypatch.setattr(preflight_module, "probe_video", lambda handle: probes.append(handle) or probe(handle))
    decode = CHECKS[("decode_video", None)]

    @temporary_check("decode_video")
    def twice(ctx: PreflightContext) -> FramesPreview | None:
        assert ctx.source("video") is ctx.source("video")
        return decode(ctx)

    planned = plan("reconstruct", clip, tiny_bundle, store_url)
    assert preflight(planned, Settings())["decode_video"] is not None and len(probes) == 1
    CHECKS.pop(("decode_video", None))
    assert preflight(planned, Settings())["decode_video"] is None and len(probes) == 1


def test_a_checks_preview_is_what_stages_downstream_see(
    clip: Path, tiny_bundle: Path, store_url: str, temporary_check
) -> None:
    seen: dict[str, FramesPreview | None] = {}

    @temporary_check("encode_latents")
    def halve(ctx: PreflightContext) -> FramesPreview:
        frames = ctx.input("frames")
        return FramesPreview(frames.count, frames.height // 8, frames.width // 8, frames.source_width,
                             frames.source_height, frames.fit)  # fmt: skip

    @temporary_check("decode_latents")
    def record(ctx: PreflightContext) -> None:
        seen["latents"] = ctx.input("latents")

    planned = plan("reconstruct", clip, tiny_bundle, store_url, "stages.decode_video.params.num_frames=4",
                   "stages.decode_video.params.width=64", "stages.decode_video.params.height=64")  # fmt: skip
    previews = preflight(planned, Settings())
    assert seen["latents"] == FramesPreview(4, 8, 8, 96, 64, "crop")
    assert previews["decode_latents"] == seen["latents"], "a check returning None passes its input through"


def test_a_check_refusing_its_input_raises_a_spec_error_naming_the_stage(
    clip: Path, tiny_bundle: Path, store_url: str, temporary_check
) -> None:
    @temporary_check("encode_latents")
    def needs_14(ctx: PreflightContext) -> None:
        frames = ctx.input("frames")
        if frames.count < 14:
            raise ValueError(f"clip has {frames.count} frames but the model needs 14")

    planned = plan("reconstruct", clip, tiny_bundle, store_url, "stages.decode_video.params.num_frames=8",
                   "stages.encode_latents.id=encode_sd", "stages.decode_latents.inputs.latents=encode_sd")  # fmt: skip
    refused = r"^stage 'encode_sd' \(encode_latents\): clip has 8 frames but the model needs 14$"
    with pytest.raises(SpecError, match=refused):
        preflight(planned, Settings())
    planned = plan("reconstruct", clip, tiny_bundle, store_url, "stages.decode_video.params.num_frames=14")
    assert preflight(planned, Settings())["encode_latents"].count == 14


def test_prepare_run_refuses_a_start_past_the_end_before_any_stage_runs(
    clip: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    overrides = [f"models.sd.id={tiny_bundle}", f"input={clip}", f"store={tmp_path / 'store'}",
                 "stages.decode_video.params.start=5"]  # fmt: skip
    spec = load_spec(spec_path("reconstruct"), overrides)
    with pytest.raises(InputVideoError, match=r"stage 'decode_video' \(decode_video\): start 5.0s is at or past the end"):
        prepare_run(spec, Settings())
    assert not (tmp_path / "store" / "decode_video").exists()


def test_model_configs_are_read_without_loading_weights(
    clip: Path, tiny_bundle: Path, store_url: str, temporary_check, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("preflight loaded a model")

    monkeypatch.setattr(FAMILIES["diffusers"], "load", refuse)
    read: dict[str, dict | None] = {}

    @temporary_check("invert_latents", "fatezero")
    def configs(ctx: PreflightContext) -> None:
        read["unet"] = ctx.model_config("unet")
        read["scheduler"] = ctx.model_config("unet", "scheduler", "scheduler_config.json")
        read["absent"] = ctx.model_config("unet", name="absent.json")

    @temporary_check("encode_latents")
    def vae_alone(ctx: PreflightContext) -> None:
        read["vae"] = ctx.model_config("vae")

    def config(*parts: str) -> dict:
        return json.loads(tiny_bundle.joinpath(*parts).read_text())

    preflight(plan("fatezero-style", clip, tiny_bundle, store_url), Settings())
    assert read == {"unet": config("unet", "config.json"), "scheduler": config("scheduler", "scheduler_config.json"),
                    "absent": None, "vae": config("vae", "config.json")}  # fmt: skip
    read.clear()
    alone = plan("reconstruct", clip, tiny_bundle / "vae", store_url)  # the VAE's folder alone: its config at the root
    assert next(p for p in alone if p.id == "encode_latents").call.models["vae"].bundle is False
    preflight(alone, Settings())
    assert read == {"vae": config("vae", "config.json")}


def test_a_check_for_a_stage_nobody_declares_is_refused() -> None:
    with pytest.raises(RegistryError, match="checks stage frobnicate_frames:mine, which no method declares"):
        stage_check("frobnicate_frames", "mine")(lambda ctx: None)
    assert ("frobnicate_frames", "mine") not in CHECKS
