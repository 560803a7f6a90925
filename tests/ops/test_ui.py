"""The run's pictures render in the Prefect UI, checked in a real (headless) browser."""

from __future__ import annotations

import os
import re

import pytest

from tests.ops.browser import Browser, chromium
from tests.ops.test_operations import clip

pytestmark = pytest.mark.flow


def test_the_contact_sheet_renders_on_the_artifact_page(ops, tiny_bundle, tmp_path) -> None:
    executable = chromium()
    if executable is None:
        if os.environ.get("CI_REQUIRE_BROWSER"):
            pytest.fail("Chromium is missing; install it with: apt-get install -y chromium")
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    source = clip(tmp_path / "pictured.mp4", seed=31)
    run = ops.wait(ops.deployment_run("edit-video/default", ops.edit_params(tiny_bundle, input=str(source),
                                                                            output=str(tmp_path / "out"))))  # fmt: skip
    assert run["state_type"] == "COMPLETED"
    sheet = card(ops, run["id"], "compute-metrics")
    url = re.search(r"!\[contact-sheet\]\(([^)]+)\)", sheet["data"])[1]
    assert url.startswith(ops.pictures_url + "/compute_metrics/"), "linked to the picture server, not embedded"
    assert sheet["key"].startswith("pictured-") and "-reconstruct-" in sheet["key"], "the card names clip and pipeline"

    # Run again: every stage is cached, and every stage's card is shown again, with the same picture.
    again = ops.wait(ops.deployment_run("edit-video/default", ops.edit_params(tiny_bundle, input=str(source),
                                                                              output=str(tmp_path / "out"))))  # fmt: skip
    cards = {a["key"] for a in ops.artifacts(again["id"]) if a["type"] == "markdown" and not a["key"].startswith("edit-")}
    assert cards == {a["key"] for a in ops.artifacts(run["id"]) if a["type"] == "markdown" and not a["key"].startswith("edit-")}
    cached = card(ops, again["id"], "compute-metrics")
    assert f"computed by run `{run['id']}`" in cached["data"]
    assert re.search(r"!\[contact-sheet\]\(([^)]+)\)", cached["data"])[1] == url

    # The edit summary plays the source beside the output (an animated WebP served like the pictures).
    (summary,) = [a for a in ops.artifacts(run["id"], "edit-")]
    preview = re.search(r"!\[source and output\]\(([^)]+)\)", summary["data"])[1]
    assert preview.startswith(ops.pictures_url) and preview.endswith("/preview.webp")

    browser = Browser(executable, tmp_path / "chromium-profile")
    try:
        for shown_card, picture in ((sheet, url), (cached, url), (summary, preview)):
            images = browser.images(f"{ops.server.ui}/artifacts/artifact/{shown_card['id']}", loaded_prefix=ops.pictures_url)
            (shown,) = [image for image in images if image[0] == picture]
            assert shown[1] is True and shown[2] > 0
    finally:
        browser.close()


def card(ops, run_id: str, stage: str) -> dict:  # noqa: ANN001
    """The card of ``stage`` (named like ``<clip>-<hash>-<pipeline>-<NN>-<stage>``) in the run's artifacts."""
    (found,) = [a for a in ops.artifacts(run_id) if a["key"] and a["key"].endswith(f"-{stage}")]
    return found
