"""The bulk-edit flow in this process: listing a library, isolating failures, skipping finished
clips, the report; and the run-stage flow against stored inputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from reelflow.core.synthetic import write_synthetic_clip
from reelflow.flows.bulk import bulk_edit, list_library
from reelflow.flows.edit import edit_video, resolve_spec
from reelflow.flows.stage import run_stage
from reelflow.schemas.errors import ArtifactNotFound, SpecError, StageFailed
from reelflow.schemas.settings import Settings
from reelflow.storage.store import ArtifactStore

ALL = ("decode_video", "encode_latents", "decode_latents", "encode_video", "compute_metrics")


def make_library(root: Path, clip: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clip, root / name)
    return root


def corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)


# listing (no Prefect) --------------------------------------------------------------------------


def test_a_glob_lists_clips_with_their_folders(tmp_path: Path, clip: Path) -> None:
    lib = make_library(tmp_path / "lib", clip, ["a.mp4", "sub/b.mp4", "sub/deeper/c.mp4", "notes.txt"])
    clips = list_library(f"{lib}/**/*.mp4", Settings())
    assert [(Path(c.url).name, c.folder) for c in clips] == [("a.mp4", ""), ("b.mp4", "sub"), ("c.mp4", "sub/deeper")]
    assert [c.folder for c in list_library(str(lib), Settings())] == ["", "sub", "sub/deeper"]


def test_manifest_files_resolve_entries_against_their_folder(tmp_path: Path, clip: Path) -> None:
    lib = make_library(tmp_path / "lib", clip, ["x/a.mp4", "b.mp4"])
    (lib / "list.txt").write_text(f"# tonight\nx/a.mp4\n\n{lib / 'b.mp4'}\n")
    (lib / "list.json").write_text(json.dumps(["b.mp4", "x/a.mp4"]))
    assert [(Path(c.url).name, c.folder) for c in list_library(str(lib / "list.txt"), Settings())] == [
        ("a.mp4", "x"),
        ("b.mp4", ""),
    ]
    assert [Path(c.url).name for c in list_library(str(lib / "list.json"), Settings())] == ["b.mp4", "a.mp4"]


@pytest.mark.parametrize(
    ("layout", "library", "message"),
    [
        ({}, "missing/*.mp4", "holds no clips"),
        ({}, "nowhere", "does not exist"),
        ({"a/c.mp4": 1, "b/c.mp4": 1, "lists/l.txt": "../a/c.mp4\n../b/c.mp4"}, "lists/l.txt", "same outputs.*folder that contains both"),
        ({"list.json": "{not json"}, "list.json", "not valid JSON"),
        ({"list.json": '{"clips": []}'}, "list.json", "JSON list"),
        ({"one.mp4": 1}, "one.mp4", "single video"),
    ],
)
def test_bad_libraries_are_refused_with_the_fix(tmp_path: Path, clip: Path, layout, library, message) -> None:
    for name, content in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if content == 1:
            shutil.copyfile(clip, tmp_path / name)
        else:
            (tmp_path / name).write_text(content)
    with pytest.raises(SpecError, match=message):
        list_library(str(tmp_path / library), Settings())


def test_a_pipeline_comes_from_exactly_one_of_spec_or_preset(make_spec) -> None:
    with pytest.raises(SpecError, match="exactly one"):
        resolve_spec(None, None)
    with pytest.raises(SpecError, match="exactly one"):
        resolve_spec(make_spec(), "reconstruct")
    with pytest.raises(SpecError, match="presets: .*reconstruct"):
        resolve_spec(None, "no-such-preset")
    assert resolve_spec(None, "reconstruct", ["seed=7"]).seed == 7


# bulk-edit ---------------------------------------------------------------------------------------


@pytest.mark.flow
def test_bulk_isolates_a_bad_clip_then_a_rerun_computes_only_what_is_missing(
    make_spec, clip: Path, tmp_path: Path
) -> None:
    lib = make_library(tmp_path / "lib", clip, ["a.mp4", "sub/b.mp4"])
    corrupt(lib / "sub" / "bad.mp4")
    spec, out = make_spec(), tmp_path / "edited"

    with pytest.raises(StageFailed, match=r"1 of 3 clips failed: bad\.mp4 \(InputVideoError"):
        bulk_edit(library=f"{lib}/**/*.mp4", spec=spec, output=str(out), concurrency=2)
    report = json.loads((out / "reconstruct.bulk.json").read_text())
    rows = {Path(c["clip"]).name: c for c in report["clips"]}
    assert [Path(c["clip"]).name for c in report["clips"]] == ["a.mp4", "b.mp4", "bad.mp4"]
    assert rows["a.mp4"]["status"] == rows["b.mp4"]["status"] == "completed"
    assert rows["bad.mp4"]["status"] == "failed" and rows["bad.mp4"]["error"].startswith("InputVideoError")
    assert (out / "a.reconstruct.mp4").is_file() and (out / "sub" / "b.reconstruct.mp4").is_file()
    assert set(rows["a.mp4"]["metrics"]) == {"psnr", "ssim"}
    # The second clip has the same bytes as the first, so every stage was already in the store.
    assert sorted(rows["a.mp4"]["computed"] + rows["b.mp4"]["computed"]) == sorted(ALL)

    # Again without skipping: the good clips compute nothing, the bad one still fails alone.
    with pytest.raises(StageFailed, match="1 of 3 clips failed"):
        bulk_edit(library=f"{lib}/**/*.mp4", spec=spec, output=str(out), skip_existing=False)
    rows = {Path(c["clip"]).name: c for c in json.loads((out / "reconstruct.bulk.json").read_text())["clips"]}
    assert rows["a.mp4"]["computed"] == rows["b.mp4"]["computed"] == []
    assert sorted(rows["a.mp4"]["cached"]) == sorted(ALL)

    # Fixed: the finished clips are skipped, only the repaired one runs.
    write_synthetic_clip(lib / "sub" / "bad.mp4", width=96, height=64, fps=24, seconds=0.5, seed=3)
    report = bulk_edit(library=f"{lib}/**/*.mp4", spec=spec, output=str(out))
    assert [c.status for c in report.clips] == ["exists", "exists", "completed"]
    assert report.clips[2].computed == list(ALL)


@pytest.mark.flow
def test_a_changed_pipeline_is_not_mistaken_for_an_existing_edit(make_spec, clip: Path, tmp_path: Path) -> None:
    lib = make_library(tmp_path / "lib", clip, ["a.mp4"])
    out = tmp_path / "edited"
    bulk_edit(library=str(lib), spec=make_spec(), output=str(out))
    report = bulk_edit(library=str(lib), spec=make_spec("stages.encode_video.params.crf=30"), output=str(out))
    (row,) = report.clips
    assert row.status == "completed" and row.computed == ["encode_video"]
    assert set(row.cached) == set(ALL) - {"encode_video"}

    # A source replaced (here: touched) after its edit is edited again; its bytes decide what is cached.
    os.utime(lib / "a.mp4")
    (row,) = bulk_edit(library=str(lib), spec=make_spec("stages.encode_video.params.crf=30"), output=str(out)).clips
    assert row.status == "completed" and row.computed == [] and set(row.cached) == set(ALL)


@pytest.mark.flow
def test_the_bulk_table_artifact_has_a_row_per_clip(make_spec, clip: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    lib = make_library(tmp_path / "lib", clip, ["one.mp4", "two.mp4"])
    spec = make_spec("name=tabled")
    bulk_edit(library=f"{lib}/*.mp4", spec=spec, output=str(tmp_path / "o"))
    with get_client(sync_client=True) as client:
        (table,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["bulk-tabled"])))
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and [Path(r["clip"]).name for r in rows] == ["one.mp4", "two.mp4"]
    assert {r["status"] for r in rows} == {"completed"} and all(r["psnr"] > 10 for r in rows)


# run-stage ---------------------------------------------------------------------------------------


def run_artifacts(flow_run_id) -> list:  # noqa: ANN001
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


@pytest.mark.flow
def test_run_stage_needs_its_inputs_in_the_store_then_computes_just_that_stage(make_spec) -> None:
    spec = make_spec()
    with pytest.raises(ArtifactNotFound, match="input 'latents' of 'decode_latents'.*run the edit-video flow"):
        run_stage(stage="decode_latents", spec=spec)
    with pytest.raises(SpecError, match="no stage 'denoise'; its stages are decode_video, encode_latents"):
        run_stage(stage="denoise", spec=spec)

    ref = run_stage(stage="decode_video", spec=spec)
    store = ArtifactStore(spec.store)
    assert store.is_complete("decode_video", ref.key) and ref.arrays["frames"].shape == (6, 64, 64, 3)
    ref = run_stage(stage="encode_latents", spec=spec)
    # Run again, the stored stage shows its card again in this run, named as the run that computed it.
    state = run_stage(stage="encode_latents", spec=spec, return_state=True)
    (card,) = [a for a in run_artifacts(state.state_details.flow_run_id) if a.key and a.key.endswith("-encode-latents")]
    assert "*cached: computed by run `" in card.data and "![latents](" in card.data
    # The full pipeline then finds both stages stored under the keys it plans.
    manifest = edit_video(spec)
    assert {r.name: r.status for r in manifest.stages}["encode_latents"] == "cached"

    before = store.read_attrs(store.artifact_path("encode_latents", ref.key))["completed_at"]
    again = run_stage(stage="encode_latents", spec=spec, recompute=True)
    assert again.key == ref.key
    assert store.read_attrs(store.artifact_path("encode_latents", ref.key))["completed_at"] > before


@pytest.mark.flow
def test_a_missing_model_fails_the_bulk_once_before_any_clip(make_spec, clip: Path, tmp_path: Path) -> None:
    from reelflow.schemas.errors import ModelError

    lib = make_library(tmp_path / "lib", clip, ["a.mp4", "b.mp4"])
    spec = make_spec(f"models.sd.id={tmp_path / 'no-model'}")
    with pytest.raises(ModelError, match="no-model"):
        bulk_edit(library=str(lib), spec=spec, output=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.flow
def test_a_retrained_model_makes_an_existing_edit_stale(make_spec, tiny_bundle: Path, clip: Path, tmp_path: Path) -> None:
    from reelflow.core.tiny import build_tiny_bundle

    model = tmp_path / "model"
    shutil.copytree(tiny_bundle, model)
    lib, out = make_library(tmp_path / "lib", clip, ["a.mp4"]), tmp_path / "edited"
    spec = make_spec(f"models.sd.id={model}")
    bulk_edit(library=str(lib), spec=spec, output=str(out))
    assert bulk_edit(library=str(lib), spec=spec, output=str(out)).clips[0].status == "exists"
    build_tiny_bundle(model, seed=1)  # retrained in place: same spec, new weights
    (row,) = bulk_edit(library=str(lib), spec=spec, output=str(out)).clips
    assert row.status == "completed" and row.cached == ["decode_video"]


@pytest.mark.flow
def test_outputs_inside_the_library_are_never_taken_for_clips(make_spec, clip: Path, tmp_path: Path) -> None:
    lib = make_library(tmp_path / "lib", clip, ["a.mp4"])
    bulk_edit(library=str(lib), spec=make_spec(), output=str(lib / "edited"))
    report = bulk_edit(library=str(lib), spec=make_spec(), output=str(lib / "edited"))
    assert [Path(c.clip).name for c in report.clips] == ["a.mp4"] and report.clips[0].status == "exists"


@pytest.mark.flow
def test_dispatch_to_a_deployment_the_server_lacks_is_refused_up_front(make_spec, clip: Path, tmp_path: Path) -> None:
    lib = make_library(tmp_path / "lib", clip, ["a.mp4"])
    with pytest.raises(SpecError, match="'edit-video/nowhere', which the Prefect server does not have; deploy it"):
        bulk_edit(library=str(lib), spec=make_spec(), output=str(tmp_path / "o"), dispatch="edit-video/nowhere")
    with pytest.raises(SpecError, match="use <flow>/<deployment>"):
        bulk_edit(library=str(lib), spec=make_spec(), output=str(tmp_path / "o"), dispatch="default")


@pytest.mark.flow
def test_run_stage_names_the_copies_of_a_repeated_stage_and_respects_holds(make_spec) -> None:
    from reelflow.schemas.errors import LeaseHeld
    from reelflow.storage.leases import Leases

    with pytest.raises(SpecError, match="repeated by `each:`; name one copy: encode_latents_0, encode_latents_1"):
        run_stage(stage="encode_latents", spec=make_spec("stages.encode_latents.each=[{}, {chunk_size: 3}]"))
    spec = make_spec()
    ref = run_stage(stage="decode_video", spec=spec)
    leases = Leases(ArtifactStore(spec.store))
    with leases.holding("another-run", [ref.key], ttl=60):
        with pytest.raises(LeaseHeld, match="in use by running edits \\(another-run\\)"):
            run_stage(stage="decode_video", spec=spec, recompute=True)
    assert ArtifactStore(spec.store).is_complete("decode_video", ref.key)
