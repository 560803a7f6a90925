"""The run's pictures render in the Prefect UI, checked in a real (headless) browser."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from pathlib import PurePosixPath

import pytest

from tests.ops.browser import Browser, chromium
from tests.ops.services import BIN, REPO, wait_for
from tests.ops.test_operations import clip

pytestmark = pytest.mark.flow


PRESETS = sorted(p.stem for p in (REPO / "deployments" / "presets").glob("*.yaml"))
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
VIDEOS = "JSON.stringify(Array.from(document.querySelectorAll('video')).map(v => [v.currentSrc, v.readyState]))"


def require_chromium() -> str:
    executable = chromium()
    if executable is None:
        if os.environ.get("CI_REQUIRE_BROWSER"):
            pytest.fail("Chromium is missing; install it with: apt-get install -y chromium")
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    return executable


def test_the_contact_sheet_renders_on_the_artifact_page(ops, tiny_bundle, tmp_path) -> None:
    executable = require_chromium()
    source = clip(tmp_path / "pictured.mp4", seed=31)
    run = ops.wait(ops.deployment_run("edit-video/default", ops.edit_params(tiny_bundle, input=str(source),
                                                                            output=str(tmp_path / "out"))))  # fmt: skip
    assert run["state_type"] == "COMPLETED"
    sheet = card(ops, run["id"], "compute-metrics")
    url = re.search(r"!\[contact-sheet\]\(([^)]+)\)", sheet["data"])[1]
    assert url.startswith(ops.pictures_url + "/compute_metrics/"), "linked to the picture server, not embedded"
    assert sheet["key"].startswith("pictured-") and "-reconstruct-" in sheet["key"], "the card names clip and pipeline"

    # A cached rerun shows every card again: test_every_presets_demo_shows_pictures_that_load_computed_and_cached.
    # The edit summary plays the source beside the output (an animated WebP served like the pictures).
    (summary,) = [a for a in ops.artifacts(run["id"], "edit-")]
    assert f"({ops.server.ui}/artifacts/artifact/{sheet['id']})" in summary["data"], (
        "the summary links each stage to the card this run showed")
    preview = re.search(r"!\[source and output\]\(([^)]+)\)", summary["data"])[1]
    assert preview.startswith(ops.pictures_url) and preview.endswith("/preview.webp")

    browser = Browser(executable, tmp_path / "chromium-profile")
    try:
        for shown_card, picture in ((sheet, url), (summary, preview)):
            images = browser.images(f"{ops.server.ui}/artifacts/artifact/{shown_card['id']}", loaded_prefix=ops.pictures_url)
            (shown,) = [image for image in images if image[0] == picture]
            assert shown[1] is True and shown[2] > 0
    finally:
        browser.close()


def card(ops, run_id: str, stage: str) -> dict:  # noqa: ANN001
    """The card of ``stage`` (named like ``<clip>-<hash>-<pipeline>-<NN>-<stage>``) in the run's artifacts."""
    (found,) = [a for a in ops.artifacts(run_id) if a["key"] and a["key"].endswith(f"-{stage}")]
    return found


def test_every_presets_demo_shows_pictures_that_load_computed_and_cached(ops, tmp_path) -> None:
    """Every preset's demo, as one comparison (its shared stages computed once), run twice: every picture of every
    card and summary loads in Chromium, each kind of picture renders on its card's page in the UI, the cached rerun
    shows the same pictures, and the summaries and output videos open from the cards."""
    executable = require_chromium()
    runs = {}
    for name in ("ui-computed", "ui-cached"):
        done = subprocess.run(
            [str(BIN / "reelflow"), "compare", "--demo", "--workdir", str(tmp_path / "demo"), "--store", str(ops.store),
             "--name", name, *PRESETS],
            env={**ops.server.env, "REELFLOW_PICTURES_URL": ops.pictures_url}, cwd=REPO, capture_output=True, text=True,
            timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (table,) = ops.server.api_post("/artifacts/filter", {"artifacts": {"key": {"any_": [f"comparison-{name}"]}}})
        runs[name] = {a["key"]: a for a in ops.artifacts(table["flow_run_id"])
                      if a["type"] == "markdown" and a["key"] and not a["key"].startswith("comparison-")}
    computed, cached = runs["ui-computed"], runs["ui-cached"]
    assert computed.keys() == cached.keys()
    for preset in PRESETS:
        assert any(key.endswith(f"-{preset}") and key.startswith("edit-") for key in computed), f"{preset}: no summary"
        assert sum(f"-{preset}-" in key for key in computed) >= 4, f"{preset}: a card per stage"
    pictures = {key: IMAGE.findall(card["data"]) for key, card in computed.items()}
    assert {key: IMAGE.findall(card["data"]) for key, card in cached.items()} == pictures, "the same pictures, cached"
    uncited = [key for key, card in cached.items() if not key.startswith(("edit-", "report-")) and "*cached: computed by run `" not in card["data"]]
    assert not uncited, ("each cached card names the run that computed it", uncited, cached[uncited[0]]["data"][:300])
    urls = sorted({url for found in pictures.values() for url in found})
    assert urls and all(url.startswith(ops.pictures_url + "/") for url in urls), "served, none embedded"
    kinds = {PurePosixPath(url).name for url in urls}
    assert {"frames.png", "latents.png", "steps.png", "attention.png", "preview.webp"} <= kinds, kinds

    # The summaries (JSON) and the output videos open from the cards.
    links = {url for card in cached.values() for url in re.findall(r"(?<!!)\[[^\]]*\]\((http[^)\s]+)\)", card["data"])}
    summaries = [url for url in links if url.endswith("/summary.json")]
    videos = [url for url in links if url.endswith("/output.mp4")]
    assert summaries and videos
    with urllib.request.urlopen(summaries[0], timeout=30) as response:
        assert json.loads(response.read())["arrays"]
    page = tmp_path / "pictures.html"
    page.write_text("".join(f'<img src="{url}">' for url in urls) + f'<video src="{videos[0]}" preload="auto" muted></video>')

    browser = Browser(executable, tmp_path / "chromium-profile")
    try:
        loaded = browser.all_images(page.as_uri())
        assert len(loaded) == len(urls) and all(width > 0 for _, _, width in loaded), [i for i in loaded if not i[2]]
        def ready() -> bool:
            state = json.loads(browser.call("Runtime.evaluate", expression=VIDEOS, returnByValue=True)["result"]["value"])
            return state[0][1] >= 2

        wait_for(ready, 30, "the output video to decode in the browser (readyState >= 2)")
        shown = {}
        for key, found in pictures.items():
            for url in found:
                shown.setdefault(PurePosixPath(url).name, (cached[key], url))
        for name, (card, url) in sorted(shown.items()):  # each kind of picture, on its card's page in the UI
            images = browser.images(f"{ops.server.ui}/artifacts/artifact/{card['id']}", loaded_prefix=url)
            assert any(src == url and width > 0 for src, _, width in images), name
    finally:
        browser.close()
