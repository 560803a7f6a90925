"""Everything on S3 (a local moto server on loopback): the library, the store, Prefect's result
records, the outputs and the manifests; a failed edit resumes from its cached stages."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import fsspec
import pytest

from reelflow.flows.bulk import bulk_edit
from reelflow.flows.edit import edit_video
from reelflow.schemas.errors import StageFailed
from reelflow.storage.store import ArtifactStore

pytestmark = pytest.mark.flow
ALL = ("decode_video", "encode_latents", "decode_latents", "encode_video", "compute_metrics")


def statuses(manifest) -> dict[str, str]:
    return {r.name: r.status for r in manifest.stages}


def test_an_edit_on_s3_fails_then_resumes_from_its_cached_stages(make_spec, clip: Path, s3_bucket, monkeypatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    fs.put_file(str(clip), f"{bucket}/library/clip.mp4")
    spec = make_spec(
        f"output=s3://{bucket}/edited", input=f"s3://{bucket}/library/clip.mp4", store=f"s3://{bucket}/store"
    )

    def broken(*args, **kwargs):
        raise ValueError("encoder crashed")

    with monkeypatch.context() as patch:
        patch.setattr("reelflow.tasks.video.encode_mp4", broken)
        with pytest.raises(StageFailed, match="stage 'encode_video' failed"):
            edit_video(spec)
    fs.invalidate_cache()
    failed = json.loads(fs.cat_file(f"{bucket}/edited/clip.reconstruct.manifest.json"))
    assert {s["name"]: s["status"] for s in failed["stages"]}["encode_video"] == "failed"
    records = [Path(p).name.split("-")[0] for p in fs.ls(f"{bucket}/store/prefect-results")]
    # One cache record per completed stage, beside the artifacts (and the failed task's error).
    assert sorted(r for r in records if r in ALL) == sorted(set(ALL) - {"encode_video"})

    manifest = edit_video(spec)
    assert statuses(manifest) == {name: "computed" if name == "encode_video" else "cached" for name in ALL}
    assert manifest.outputs["encode_video"] == f"s3://{bucket}/edited/clip.reconstruct.mp4"
    fs.invalidate_cache()
    assert fs.size(f"{bucket}/edited/clip.reconstruct.mp4") > 1000
    assert ArtifactStore(spec.store, options).is_complete("encode_video", manifest.stages[3].key)

    # The contact sheet is linked by a presigned URL that a browser (here urllib) can load.
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[failed["run_id"]]))
        )
    sheet = next(a for a in artifacts if a.key and a.key.endswith("-compute-metrics"))
    url = re.search(r"!\[contact-sheet\]\((http[^)]+)\)", sheet.data)[1]
    assert "Signature=" in url or "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_bulk_edit_over_an_s3_library(make_spec, clip: Path, s3_bucket) -> None:
    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    for name in ("night/a.mp4", "day/b.mp4"):
        fs.put_file(str(clip), f"{bucket}/library/{name}")
    report = bulk_edit(
        library=f"s3://{bucket}/library/**/*.mp4", spec=make_spec(store=f"s3://{bucket}/store"),
        output=f"s3://{bucket}/edited",
    )  # fmt: skip
    assert [(c.clip, c.status) for c in report.clips] == [
        (f"s3://{bucket}/library/day/b.mp4", "completed"),
        (f"s3://{bucket}/library/night/a.mp4", "completed"),
    ]
    fs.invalidate_cache()
    assert fs.isfile(f"{bucket}/edited/night/a.reconstruct.mp4") and fs.isfile(f"{bucket}/edited/day/b.reconstruct.mp4")
    assert json.loads(fs.cat_file(f"{bucket}/edited/reconstruct.bulk.json"))["pipeline"] == "reconstruct"
    again = bulk_edit(library=f"s3://{bucket}/library/**/*.mp4", spec=make_spec(store=f"s3://{bucket}/store"),
                      output=f"s3://{bucket}/edited")  # fmt: skip
    assert [c.status for c in again.clips] == ["exists", "exists"]
