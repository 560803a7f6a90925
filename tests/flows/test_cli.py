"""The reelflow command line: exit codes, one-line errors before heavy work, inspect, gc, models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reelflow.flows.cli import main
from reelflow.storage.store import ArtifactStore
from tests.fixtures import write_audio_only

pytestmark = pytest.mark.flow


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tiny_args(bundle: Path, store: Path, output: Path) -> list[str]:
    return [
        "--store", str(store), "--output", str(output),
        "--set", f"models.sd.id={bundle}",
        "--set", "stages.decode_video.params.num_frames=4",
        "--set", "stages.decode_video.params.width=64",
        "--set", "stages.decode_video.params.height=64",
        "--set", "stages.decode_video.params.multiple=8",
        "--set", "stages.encode_video.params.preset=ultrafast",
    ]  # fmt: skip


def complete_artifacts(store: Path) -> list[str]:
    if not store.exists():
        return []
    return [i.path for i in ArtifactStore(str(store)).list() if i.complete]


def test_run_then_inspect_and_gc(capsys, tiny_bundle: Path, clip: Path, tmp_path: Path) -> None:
    store, output = tmp_path / "store", tmp_path / "out"
    code, out, _ = run_cli(capsys, "run", "reconstruct", "--input", str(clip), *tiny_args(tiny_bundle, store, output))
    assert code == 0
    assert "reconstruct: completed" in out and "decode_video" in out and "computed" in out
    manifest = json.loads((output / "clip.reconstruct.manifest.json").read_text())
    latents = next(s for s in manifest["stages"] if s["name"] == "encode_latents")

    code, out, _ = run_cli(capsys, "inspect", latents["key"][:10], "--store", str(store))
    assert code == 0
    assert "encode_latents" in out and "(4, 4, 8, 8)" in out and "float16" in out
    assert "dims (frame,latent_channel,y,x)" in out
    assert manifest["stages"][0]["key"][:16] in out, "inspect lists the input artifact"
    code, by_url, _ = run_cli(capsys, "inspect", latents["artifact"])
    assert code == 0 and by_url == out

    code, out, _ = run_cli(capsys, "list", "--store", str(store))
    assert code == 0 and "5 artifacts in" in out and out.count("complete") == 5
    code, out, _ = run_cli(capsys, "list", "--store", str(store), "--stage", "encode_latents")
    assert code == 0 and latents["key"][:16] in out and "1 artifact in" in out

    code, out, _ = run_cli(capsys, "gc", "--store", str(store), "--older-than", "0s", "--dry-run")
    assert code == 0 and "would remove 5 entries" in out and len(complete_artifacts(store)) == 5
    code, out, _ = run_cli(capsys, "gc", "--store", str(store), "--older-than", "0s")
    assert code == 0 and "removed 5 entries" in out and complete_artifacts(store) == []


def test_inspect_unknown_key_is_one_line(capsys, tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    code, _, err = run_cli(capsys, "inspect", "deadbeef", "--store", str(tmp_path / "store"))
    assert code == 1
    assert err.strip().startswith("reelflow: error: no artifact") and err.count("\n") == 1


def test_models_tiny_writes_a_loadable_bundle(capsys, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    code, out, _ = run_cli(capsys, "models", "tiny", str(tmp_path / "bundle"))
    assert code == 0 and str(tmp_path / "bundle") in out
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "bundle", safety_checker=None)
    assert pipe.vae.config.latent_channels == 4 and pipe.tokenizer("a cat").input_ids[0] == pipe.tokenizer.bos_token_id


@pytest.mark.parametrize("preset", ["fatezero-local", "fatezero-attribute"])
def test_demo_runs_the_fatezero_presets(preset: str, capsys, tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "demo", "--workdir", str(tmp_path / "demo"), "--preset", preset)
    assert code == 0 and f"{preset}: completed" in out and "invert_latents" in out and "denoise_latents" in out
    assert list((tmp_path / "demo" / "output").glob(f"source.{preset}*.mp4"))


def test_demo_runs_videoshop_on_the_tiny_svd_with_an_edited_frame_made_from_the_clip(capsys, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from reelflow.core.synthetic import write_edited_first_frame

    code, out, _ = run_cli(capsys, "demo", "--workdir", str(tmp_path / "demo"), "--preset", "videoshop")
    assert code == 0 and "videoshop: completed" in out and "embed_content" in out
    assert (tmp_path / "demo" / "models" / "tiny-svd" / "unet").is_dir()
    write_edited_first_frame(tmp_path / "demo" / "source.mp4", tmp_path / "expected.png")
    made = np.asarray(Image.open(tmp_path / "demo" / "sources" / "edited_frame.png"))
    np.testing.assert_array_equal(made, np.asarray(Image.open(tmp_path / "expected.png")))
    assert list((tmp_path / "demo" / "output").glob("source.videoshop.mp4"))


def test_demo_runs_the_gen1_sweep_on_tiny_depth_and_controlnet(capsys, tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "demo", "--workdir", str(tmp_path / "demo"), "--preset", "gen1-controlnet")
    assert code == 0 and "gen1-controlnet: completed" in out and "estimate_depth" in out
    assert "denoise_latents_0" in out and "denoise_latents_1" in out  # t_s 0 and 3 from one depth
    assert len(list((tmp_path / "demo" / "output").glob("source.gen1-controlnet.*.mp4"))) == 2


@pytest.mark.parametrize("preset", ["soundini", "soundini-sd"])
def test_demo_runs_soundini_on_the_clips_own_tone_with_a_centred_mask(capsys, tmp_path: Path, preset: str) -> None:
    code, out, _ = run_cli(capsys, "demo", "--workdir", str(tmp_path / "demo"), "--preset", preset)
    assert code == 0 and f"{preset}: completed" in out
    assert all(stage in out for stage in ("decode_mask", "embed_audio", "estimate_flow", "denoise_latents"))
    assert ("encode_latents" in out) == (preset == "soundini-sd")  # the reference's backbone denoises pixels
    assert list((tmp_path / "demo" / "output").glob(f"source.{preset}.mp4"))


def test_demo_runs_the_whole_pipeline_then_serves_it_from_cache(capsys, tmp_path: Path) -> None:
    workdir = tmp_path / "demo dir #1"  # a space and a '#' must survive the spec overrides
    code, out, _ = run_cli(capsys, "demo", "--workdir", str(workdir))
    assert code == 0 and "reconstruct: completed" in out and out.count("computed") == 5
    assert (workdir / "output" / "source.reconstruct.mp4").is_file()
    assert (workdir / "output" / "source.reconstruct.manifest.json").is_file()
    code, out, _ = run_cli(capsys, "demo", "--workdir", str(workdir))
    assert code == 0 and out.count("cached") == 5 and "computed" not in out


def _text_as_mp4(path: Path) -> None:
    path.write_text("this is not a video\n" * 100)


BAD_INPUTS = {
    "missing": (lambda p, clip: None, "does not exist"),
    "zero-byte": (lambda p, clip: p.write_bytes(b""), "is empty (0 bytes)"),
    "text named .mp4": (lambda p, clip: _text_as_mp4(p), "not a media file"),
    "no video stream": (lambda p, clip: write_audio_only(p), "no video stream"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_video_fails_cleanly(case: str, capsys, tiny_bundle: Path, clip: Path, tmp_path: Path) -> None:
    make, message = BAD_INPUTS[case]
    video = tmp_path / "input.mp4"
    make(video, clip)
    store = tmp_path / "store"
    args = tiny_args(tiny_bundle, store, tmp_path / "out")
    every_frame = ["--set", "stages.decode_video.params.num_frames=24"]
    code, _, err = run_cli(capsys, "run", "reconstruct", "--input", str(video), *args, *every_frame)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("reelflow: error:") and message in lines[-1]
    assert "Traceback" not in err
    assert complete_artifacts(store) == []


def test_truncated_video_fails_in_decode_with_one_line_and_no_traceback(
    prefect_harness: str, tiny_bundle: Path, clip: Path, tmp_path: Path
) -> None:
    """Run as a user would, in a subprocess: the header reads, decoding finds the frames missing."""
    video, store, output = tmp_path / "cut.mp4", tmp_path / "store", tmp_path / "out"
    data = clip.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    argv = ["run", "reconstruct", "--input", str(video), *tiny_args(tiny_bundle, store, output)]
    argv += ["--set", "stages.decode_video.params.num_frames=24"]
    env = {**os.environ, "PREFECT_API_URL": prefect_harness, "PREFECT_LOGGING_LEVEL": "INFO"}
    done = subprocess.run([sys.executable, "-m", "reelflow.flows.cli", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("reelflow: error: stage 'decode_video' failed: InputVideoError:")
    assert "truncated or corrupt: expected 24 frames" in last
    assert "Traceback" not in done.stderr + done.stdout
    assert complete_artifacts(store) == []
    manifest = json.loads((output / "cut.reconstruct.manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"]] == ["failed"] + ["skipped"] * 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.0.stage=decod_video", "is not a stage; stages: "),
        ("stages.encode_video.params.crff=2", "stages.encode_video.params.crff: unknown field"),
        ("stages.encode_latents.inputs.frames=nowhere", "not a stage of this pipeline"),
    ],
)
def test_bad_spec_fails_before_anything_runs(override: str, message: str, capsys, tiny_bundle, clip, tmp_path) -> None:
    store = tmp_path / "store"
    args = ["run", "reconstruct", "--input", str(clip), *tiny_args(tiny_bundle, store, tmp_path / "out"), "--set", override]
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and message in err and err.count("\n") == 1
    assert not store.exists()


def test_unwritable_store_fails_before_anything_runs(capsys, tiny_bundle, clip, tmp_path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the store's parent should be")
    code, _, err = run_cli(capsys, "run", "reconstruct", "--input", str(clip), *tiny_args(tiny_bundle, blocker / "store", tmp_path / "out"))
    assert code == 1 and "is not writable" in err and err.count("\n") == 1


def test_missing_model_path_fails_before_anything_runs(capsys, clip, tmp_path) -> None:
    store = tmp_path / "store"
    code, _, err = run_cli(capsys, "run", "reconstruct", "--input", str(clip), *tiny_args(tmp_path / "no-model", store, tmp_path / "out"))
    assert code == 1 and "no-model" in err and err.count("\n") == 1
    assert complete_artifacts(store) == []


def test_unknown_preset_lists_presets(capsys, tmp_path) -> None:
    code, _, err = run_cli(capsys, "run", "no-such-preset")
    listed = ("presets: fatezero-attribute, fatezero-local, fatezero-lowcost, fatezero-style, gen1-controlnet, "
              "gen1-depth2img, gen1-reference, gen1-vace, reconstruct, reconstruct-wan, soundini, soundini-sd, videoshop, videoshop-naive, "
              "videoshop-wan")
    assert code == 1 and listed in err


# What a new user tripped on ---------------------------------------------------------------------

KEY = "c3" * 32


def one_artifact_store(root: Path) -> Path:
    """A store holding one small complete artifact, written straight through the store."""
    import numpy as np

    with ArtifactStore(str(root)).write("encode_latents", KEY, {"provenance": {"key": KEY}}) as writer:
        writer.write_array("latents", np.zeros((2, 4, 8, 8), np.float32), dims=("frame", "latent_channel", "y", "x"))
    return root


def cli_subprocess(*argv: str) -> list[str]:
    return [sys.executable, "-m", "reelflow.flows.cli", *argv]


# Every subcommand, with the least it needs to parse.
SUBCOMMANDS = {
    "run": ["run", "reconstruct"],
    "bulk": ["bulk", "clips/*.mp4", "reconstruct"],
    "demo": ["demo"],
    "inspect": ["inspect", KEY],
    "list": ["list"],
    "gc": ["gc"],
    "serve-pictures": ["serve-pictures"],
    "models tiny": ["models", "tiny", "bundle"],
}


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_debug_is_accepted_before_and_after_any_subcommand(command: str) -> None:
    from reelflow.flows.cli import build_parser

    argv = SUBCOMMANDS[command]
    parser = build_parser()
    assert parser.parse_args(argv).debug is False
    assert parser.parse_args(["--debug", *argv]).debug is True, "the subcommand must not reset a --debug before it"
    assert parser.parse_args([*argv, "--debug"]).debug is True


def test_debug_after_the_subcommand_shows_the_traceback(capsys, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    code, _, err = run_cli(capsys, "list", "--store", missing, "--debug")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("reelflow: error: store")
    code, _, err = run_cli(capsys, "list", "--store", missing)
    assert code == 1 and "Traceback" not in err


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("command", ["list", "inspect", "gc", "--help"])
def test_a_closed_stdout_ends_the_command_quietly(command: str, buffered: bool, tmp_path: Path) -> None:
    """``reelflow list | head``: the reader goes away before the command writes; no error, no traceback."""
    store = str(one_artifact_store(tmp_path / "store"))
    argv = {"list": ["list", "--store", store], "inspect": ["inspect", KEY[:8], "--store", store],
            "gc": ["gc", "--store", store, "--dry-run"], "--help": ["--help"]}[command]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update({} if buffered else {"PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen(cli_subprocess(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # long before the child has imported anything, let alone written
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert err == "", "a closed stdout is not an error to report"
    if command != "--help":  # argparse itself swallows a failed write of the help when unbuffered (exit 0)
        assert code == 1


@pytest.mark.parametrize("argv", [["list"], ["inspect", KEY[:8]], ["gc", "--older-than", "1d"]], ids=lambda a: a[0])
def test_reading_commands_refuse_a_store_that_does_not_exist(argv: list[str], capsys, tmp_path, monkeypatch) -> None:
    missing = tmp_path / "typo" / "store"
    code, out, err = run_cli(capsys, *argv, "--store", str(missing))
    assert code == 1 and out == "" and err.count("\n") == 1
    assert f"store {str(missing)!r} does not exist" in err and "--store or REELFLOW_STORE" in err
    monkeypatch.setenv("REELFLOW_STORE", str(missing))
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and f"store {str(missing)!r} does not exist" in err
    assert not (tmp_path / "typo").exists(), "refusing a store must not create it"


def test_list_and_gc_count_in_the_singular(capsys, tmp_path: Path) -> None:
    store = str(one_artifact_store(tmp_path / "store"))
    code, out, _ = run_cli(capsys, "list", "--store", store)
    assert code == 0 and out.strip().splitlines()[-1] == f"1 artifact in {store}"
    code, out, _ = run_cli(capsys, "gc", "--store", store, "--older-than", "0s", "--dry-run")
    assert code == 0 and "would remove 1 entry," in out


def test_demo_help_states_its_sizes_and_where_everything_goes(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    assert "8 frames at 96x64" in text and "invert_latents:fatezero: num_steps=6" in text
    assert "<workdir>/output" in text and "(default: demo)" in text
