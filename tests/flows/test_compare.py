"""``reelflow compare``: methods on the same clips share their common stages; one table; reports a browser opens."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest

from reelflow.deployments import spec_path
from reelflow.flows.cli import main
from reelflow.flows.compare import _clips, compare_methods, resolve_methods, to_csv
from reelflow.schemas.errors import SpecError, StageFailed
from reelflow.schemas.loading import load_spec
from reelflow.schemas.manifest import Comparison, RunManifest
from reelflow.schemas.settings import Settings
from reelflow.storage.store import ArtifactStore
from tests.flows.conftest import FATEZERO_TINY

SHARED = ("stages.decode_video.params.num_frames=3", "stages.decode_video.params.width=64",
          "stages.decode_video.params.height=64", "stages.decode_video.params.multiple=8",
          "stages.encode_video.params.preset=ultrafast")  # fmt: skip
FATEZERO = tuple(o for o in FATEZERO_TINY if "source_prompt" not in o)  # the preset's prompt names its blend words


@pytest.fixture(scope="module")
def compared(prefect_harness: str, tiny_bundle: Path, clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Comparison:
    """reconstruct and fatezero-local on one clip: the same decode and VAE encoding, then different edits."""
    root = tmp_path_factory.mktemp("compare")
    common = (f"models.sd.id={tiny_bundle}", f"input={clip}", f"store={root / 'store'}", f"output={root / 'out'}", *SHARED)
    specs = [load_spec(spec_path("reconstruct"), common), load_spec(spec_path("fatezero-local"), [*common, *FATEZERO])]
    return compare_methods(specs=specs, name="pair")


def manifests(comparison: Comparison) -> list[RunManifest]:
    return [RunManifest.model_validate_json(Path(row.manifest).read_text()) for row in comparison.rows]


@pytest.mark.flow
def test_two_presets_that_share_decode_and_vae_compute_them_once(compared: Comparison) -> None:
    first, second = manifests(compared)
    assert all(Path(m.outputs["report"]).is_file() for m in (first, second))  # the manifest on disk names its report
    shared = {"decode_video", "encode_latents"}
    keys = {r.name: r.key for r in first.stages}
    assert {r.name: r.key for r in second.stages if r.name in shared} == {n: keys[n] for n in shared}
    assert {r.name: r.status for r in first.stages} == dict.fromkeys(keys, "computed")
    reused = {r.name: (r.status, r.seconds) for r in second.stages if r.name in shared}
    assert reused == dict.fromkeys(shared, ("cached", 0.0))
    assert all(r.status == "computed" for r in second.stages if r.name not in shared)
    store = ArtifactStore(compared.store)
    assert [len(list(store.list(stage))) for stage in sorted(shared)] == [1, 1]  # one artifact each, not two
    assert compared.stages_planned == len(first.stages) + len(second.stages)
    assert compared.stages_distinct == compared.stages_planned - 2
    by_method = {row.method: row for row in compared.rows}
    # The second edit needs the shared stages' seconds but did not compute them.
    shared_seconds = sum(r.compute_seconds for r in first.stages if r.name in shared)
    fatezero = by_method["fatezero-local"]
    assert fatezero.stage_seconds - fatezero.computed_seconds == pytest.approx(shared_seconds, abs=1e-3)
    assert compared.stage_seconds - compared.computed_seconds == pytest.approx(shared_seconds, abs=1e-3)


@pytest.mark.flow
def test_the_table_has_a_row_per_method_and_clip_with_metrics_costs_and_provenance(compared: Comparison, tiny_bundle: Path) -> None:
    with open(compared.outputs["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["reconstruct", "fatezero-local"]
    for row in rows:
        assert (row["frames"], row["width"], row["height"], row["seed"], row["status"]) == ("3", "64", "64", "0", "completed")
        assert row["models"] == f"sd={tiny_bundle}"  # by the spec's model name, which fills every role here
        assert float(row["psnr"]) > 0 and float(row["ssim"]) <= 1
        assert float(row["stage_seconds"]) > 0 and int(row["bytes"]) > 0 and int(row["peak_memory"]) > 0
        assert Path(row["output"]).is_file() and Path(row["report"]).is_file()
    assert Comparison.model_validate_json(Path(compared.outputs["json"]).read_text()).rows == compared.rows

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (table,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["comparison-pair"])))
        (link,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["comparison-report-pair"])))
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and [r["method"] for r in data] == ["reconstruct", "fatezero-local"]
    assert Path(compared.outputs["report"]).as_uri() in str(link.data)  # Prefect keeps a link artifact as markdown


@pytest.mark.flow
def test_the_reports_open_in_chromium_with_every_image_loaded_and_every_video_playing(compared: Comparison, tmp_path: Path) -> None:
    from tests.ops.browser import Browser, chromium

    executable = chromium()
    if executable is None:
        if os.environ.get("CI_REQUIRE_BROWSER"):
            pytest.fail("Chromium is missing; install it with: apt-get install -y chromium")
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    pages = [compared.outputs["report"], *(row.report for row in compared.rows)]
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    browser = Browser(executable, profile)
    try:
        for page in pages:
            images, videos = open_report(browser, Path(page).as_uri())
            assert images and all(done and width > 0 for _, done, width in images), f"a broken image in {page}"
            assert len(videos) >= 2 and all(state >= 2 and advanced for state, advanced in videos), f"{page}: {videos}"
    finally:
        browser.close()


IMAGES = "JSON.stringify(Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]))"
# Each video from its start, unlooped: it has played when its time moved past where it began.
REWIND = "Array.from(document.querySelectorAll('video')).forEach(v => {v.pause(); v.loop = false; v.currentTime = 0; v.play();}); 1"
VIDEOS = "JSON.stringify(Array.from(document.querySelectorAll('video')).map(v => [v.readyState, v.currentTime > 0]))"


def open_report(browser, url: str, timeout: float = 60) -> tuple[list, list]:  # noqa: ANN001
    browser.call("Page.navigate", url=url)
    deadline = time.monotonic() + timeout
    while True:
        state = browser.call("Runtime.evaluate", expression="document.readyState", returnByValue=True)["result"].get("value")
        if state == "complete" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    images = json.loads(browser.call("Runtime.evaluate", expression=IMAGES, returnByValue=True)["result"]["value"])
    browser.call("Runtime.evaluate", expression=REWIND, returnByValue=True)
    while True:
        videos = json.loads(browser.call("Runtime.evaluate", expression=VIDEOS, returnByValue=True)["result"]["value"])
        if (videos and all(state >= 2 and advanced for state, advanced in videos)) or time.monotonic() > deadline:
            return images, videos
        time.sleep(0.2)


def test_methods_resolve_with_labels_and_overrides_for_all_or_one() -> None:
    a, b = resolve_methods(["reconstruct", "short=reconstruct"], [], ["seed=3", "short:stages.decode_video.params.num_frames=2"])
    assert (a.name, a.seed, b.name, b.seed) == ("reconstruct", 3, "short", 3)
    preset = load_spec(spec_path("reconstruct")).stages[0].params.num_frames
    assert (a.stages[0].params.num_frames, b.stages[0].params.num_frames) == (preset, 2) and preset != 2


def test_clips_that_would_write_the_same_outputs_are_refused(clip: Path, tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "shot.mp4").write_bytes(clip.read_bytes())
    pipelines = resolve_methods(["reconstruct"], [], [])
    given = [str(tmp_path / "a" / "shot.mp4"), str(tmp_path / "b" / "shot.mp4")]
    with pytest.raises(SpecError, match="would write the same outputs"):
        _clips(given, pipelines, str(tmp_path / "out"), Settings())
    with pytest.raises(SpecError, match="given twice"):
        _clips([given[0], given[0]], pipelines, str(tmp_path / "out"), Settings())
    earlier = tmp_path / "out" / "shot.reconstruct.mp4"  # an edit of an earlier comparison is never a clip
    earlier.parent.mkdir()
    earlier.write_bytes(clip.read_bytes())
    assert [c.url for c in _clips([str(tmp_path / "a"), str(tmp_path / "out")], pipelines, str(tmp_path / "out"), Settings())] == [
        str(tmp_path / "a" / "shot.mp4")]  # fmt: skip


@pytest.mark.parametrize(
    ("methods", "overrides", "message"),
    [
        ([], [], "nothing to compare"),
        (["reconstruct", "reconstruct"], [], "named twice"),
        (["reconstruct"], ["other:seed=1"], "names no method"),
        (["no-such-preset"], [], "neither a spec file nor a preset"),
    ],
)
def test_bad_comparisons_are_refused_before_anything_runs(methods: list[str], overrides: list[str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        resolve_methods(methods, [], overrides)


def test_the_command_line_refuses_a_bad_comparison_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "reconstruct", "reconstruct"]) == 1
    assert capsys.readouterr().err.strip().startswith("reelflow: error: methods reconstruct are named twice")
    assert main(["compare", "reconstruct", "--name", "../elsewhere"]) == 1
    assert "--name '../elsewhere' must be lowercase letters" in capsys.readouterr().err


@pytest.mark.flow
def test_a_metric_without_a_value_is_blank_in_the_csv_and_survives_the_json(compared: Comparison) -> None:
    row = compared.rows[0].model_copy(update={"metrics": {"psnr": None}, "peak_memory": None})
    table = compared.model_copy(update={"rows": [row]})
    record = next(csv.DictReader(to_csv(table).splitlines()))
    assert (record["psnr"], record["peak_memory"]) == ("", "")
    assert Comparison.model_validate_json(table.model_dump_json()).rows[0].metrics == {"psnr": None}


@pytest.mark.flow
def test_a_failed_edit_fails_the_comparison_after_the_others_finish_and_the_table_says_why(
    make_spec, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import reelflow.tasks.video as video

    real = video._encode

    def encode(ctx):  # noqa: ANN001, ANN202
        if ctx.call.stage.params.crf == 20:
            raise RuntimeError("encoder exploded")
        return real(ctx)

    monkeypatch.setattr(video, "_encode", encode)
    base = make_spec()
    other = load_spec(base.model_dump(mode="json"), ["name=other", "stages.encode_video.params.crf=20"])
    with pytest.raises(StageFailed, match="1 of 2 edits failed: other on clip.mp4: encode_video: RuntimeError: encoder exploded"):
        compare_methods(specs=[base, other], name="broken")
    with open(tmp_path / "out" / "broken.csv", newline="") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert (rows["reconstruct"]["status"], rows["other"]["status"]) == ("completed", "failed")
    assert "encoder exploded" in rows["other"]["error"] and float(rows["other"]["psnr"]) > 0  # its metrics still ran
    assert Path(rows["other"]["report"]).is_file()  # a failed edit's report shows what ran
