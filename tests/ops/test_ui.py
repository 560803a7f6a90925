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
    (sheet,) = ops.artifacts(run["id"], "compute-metrics-")
    url = re.search(r"!\[contact-sheet\]\(([^)]+)\)", sheet["data"])[1]
    assert url.startswith(ops.pictures_url + "/compute_metrics/"), "linked to the picture server, not embedded"

    browser = Browser(executable, tmp_path / "chromium-profile")
    try:
        images = browser.images(f"{ops.server.ui}/artifacts/artifact/{sheet['id']}", loaded_prefix=ops.pictures_url)
    finally:
        browser.close()
    (shown,) = [image for image in images if image[0] == url]
    assert shown[1] is True and shown[2] > 0
