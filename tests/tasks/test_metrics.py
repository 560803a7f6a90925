"""compute_metrics through the stage seam: each metric takes the inputs, models and prompts it needs (and the
pipeline is refused before anything runs when they are missing), per frame or per pair, with means in the attrs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reelflow.core.tiny_metrics import build_tiny_dino
from reelflow.flows.edit import prepare_run
from reelflow.schemas.errors import SpecError
from reelflow.schemas.loading import load_spec
from reelflow.schemas.metrics import METRICS
from reelflow.schemas.settings import Settings
from reelflow.tasks.metrics import IMPLEMENTATIONS
from tests.tasks.test_soundini import models, run, spec  # noqa: F401  (models: the module's tiny models, a fixture)

EVERY_UNPROMPTED = ("psnr", "ssim", "lpips", "psnr_outside", "psnr_inside", "ssim_outside", "ssim_inside", "lpips_outside",
                    "lpips_inside", "clip_consistency_consecutive", "clip_consistency_all_pairs", "clip_source",
                    "warp_error", "flicker", "dino_consistency", "audio_visual")  # fmt: skip


def test_every_declared_metric_has_an_implementation_and_no_other() -> None:
    assert set(IMPLEMENTATIONS) == set(METRICS)


def test_the_key_holds_the_metrics_and_only_the_prompts_they_read() -> None:
    from reelflow.schemas.metrics import ComputeMetrics

    assert ComputeMetrics().key_params() == {"metrics": ["psnr", "ssim"]}
    prompted = ComputeMetrics(params={"metrics": ["clip_text"], "prompt": "a fire", "source_prompt": "a lake", "batch_size": 2})
    assert prompted.key_params() == {"metrics": ["clip_text"], "prompt": "a fire"}


def test_only_the_models_and_inputs_the_metrics_need_are_taken(models, clip: Path, tmp_path: Path) -> None:  # noqa: F811
    raw = spec(models, clip, tmp_path / "store", preset="soundini").model_dump(mode="json", exclude_unset=True)
    plain = load_spec(_with_metrics(raw, ("psnr",))).graph.nodes["compute_metrics"]
    assert dict(plain.models) == {} and set(plain.inputs) == {"source", "edited"}  # a CLIP and a mask are there, unused
    raw["models"]["other_clip"] = dict(raw["models"]["clip"])  # two CLIPs fit: the one named like the role is taken
    region = load_spec(_with_metrics(raw, ("audio_visual",))).graph.nodes["compute_metrics"]
    assert dict(region.models) == {"clip": "clip"} and set(region.inputs) == {"source", "edited", "audio", "mask"}


def _with_metrics(raw: dict, metrics: tuple[str, ...], **params: object) -> dict:
    stage = next(s for s in raw["stages"] if s["stage"] == "compute_metrics")
    stage["params"] = {"metrics": list(metrics), **params}
    return raw


def test_a_sound_edit_is_measured_by_every_metric_that_needs_no_prompt(models, clip: Path, tmp_path: Path) -> None:  # noqa: F811
    raw = spec(models, clip, tmp_path / "store", preset="soundini").model_dump(mode="json", exclude_unset=True)
    raw["models"]["dino"] = {"id": str(build_tiny_dino(tmp_path / "dino")), "family": "transformers"}
    out = run(load_spec(_with_metrics(raw, EVERY_UNPROMPTED)))
    measured, attrs = out["compute_metrics"], dict(out["compute_metrics"].attrs)
    for name in EVERY_UNPROMPTED:
        expected = 4 if METRICS[name].per == "frame" else 3
        assert measured[name].shape == (expected,), name
        assert attrs["metrics"][name] == pytest.approx(float(np.nanmean(measured[name][:])), abs=1e-5), name
    assert (measured["psnr_outside"][:] == 100).all() and (measured["lpips_outside"][:] == 0).all()  # the background pasted
    assert (measured["psnr_inside"][:] < 100).all()  # the region edited
    assert (np.abs(measured["clip_consistency_consecutive"][:]) <= 1 + 1e-6).all()
    assert (np.abs(measured["clip_source"][:]) <= 1 + 1e-6).all() and (np.abs(measured["audio_visual"][:]) <= 1 + 1e-6).all()


def test_the_prompted_clip_metrics_read_the_prompts_they_are_given(models, clip: Path, tmp_path: Path) -> None:  # noqa: F811
    raw = spec(models, clip, tmp_path / "store", preset="soundini").model_dump(mode="json", exclude_unset=True)
    prompted = ("clip_text", "frame_accuracy")
    ours = run(load_spec(_with_metrics(raw, prompted, prompt="a fire", source_prompt="a lake")))["compute_metrics"]
    swapped = run(load_spec(_with_metrics(raw, prompted, prompt="a lake", source_prompt="a fire")))["compute_metrics"]
    np.testing.assert_array_equal(ours["frame_accuracy"][:] + swapped["frame_accuracy"][:], 1.0)  # no ties on random CLIP
    assert not np.allclose(ours["clip_text"][:], swapped["clip_text"][:])


@pytest.mark.parametrize(
    ("metrics", "params", "drop", "message"),
    [
        (("psnr_inside",), {}, "decode_mask", "metric psnr_inside needs a `mask` input .*: add a stage that makes it"),
        (("warp_error",), {}, "estimate_flow", "metric warp_error needs a `flow` input"),
        (("clip_text",), {}, None, "metric clip_text needs `prompt`: the target prompt"),
        (("frame_accuracy",), {"prompt": "a fire"}, None, "metric frame_accuracy needs `source_prompt`"),
        (("psnr", "sharpness"), {}, None, "unknown metric 'sharpness'; known: psnr, ssim"),
        (("dino_consistency",), {}, None, "the dino role is a 'clip' model; dino_consistency takes a DINO ViT"),
        (("warp_error",), {}, "FLOW ON EDIT", "the flow 'estimate_flow' is estimated on 'denoise_latents', not on the source"),
    ],
)
def test_a_metric_whose_needs_are_missing_is_refused_before_anything_runs(
    models, clip: Path, tmp_path: Path, metrics: tuple[str, ...], params: dict, drop: str | None, message: str  # noqa: F811
) -> None:
    raw = spec(models, clip, tmp_path / "store", preset="soundini").model_dump(mode="json", exclude_unset=True)
    raw = _with_metrics(raw, metrics, **params)
    if drop == "FLOW ON EDIT":  # the flow of the edited frames, not the source's
        next(s for s in raw["stages"] if s["stage"] == "estimate_flow")["inputs"] = {"frames": "denoise_latents"}
    elif drop is not None:  # the stage and what reads it, but not the metrics
        raw["stages"] = [s for s in raw["stages"] if s["stage"] != drop]
        for stage in raw["stages"]:
            stage.get("inputs", {}).pop("mask" if drop == "decode_mask" else "flow", None)
        raw["stages"] = [s for s in raw["stages"] if s["stage"] not in ("denoise_latents", "encode_video")]
        next(s for s in raw["stages"] if s["stage"] == "compute_metrics")["inputs"] = {"source": "decode_video", "edited": "decode_video"}
    with pytest.raises(SpecError, match=message):
        prepare_run(load_spec(raw), Settings())
