"""Pictures in the Prefect UI: embedded ones stay small enough for Prefect's events."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reelflow.schemas.settings import Settings
from reelflow.storage.store import ArtifactStore
from reelflow.tasks.artifacts import EMBED_BYTES, contact_sheet, picture_markdown, publish_markdown

KEY = "d4" * 32


def real_size_sheet() -> bytes:
    """A contact sheet as compute_metrics draws it for 8 frames of 512x512 (noise: megabytes of PNG)."""
    frames = np.random.default_rng(0).integers(0, 256, (8, 512, 512, 3), dtype=np.uint8)
    return contact_sheet(frames, rows=[frames[::-1]])


def embedded(markdown: str) -> tuple[str, bytes]:
    match = re.search(r"\(data:image/(\w+);base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert match, markdown[:200]
    return match[1], base64.b64decode(match[2])


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    store = ArtifactStore(str(tmp_path / "store"))
    store.ensure_reachable()
    return store


def test_a_megabyte_picture_is_embedded_as_a_bounded_thumbnail(store: ArtifactStore) -> None:
    png = real_size_sheet()
    assert len(png) > 4 * 2**20
    markdown = picture_markdown(store, "compute_metrics", KEY, "contact-sheet", png, Settings())

    kind, data = embedded(markdown)
    assert kind == "jpeg" and len(data) <= EMBED_BYTES
    full, thumb = Image.open(io.BytesIO(png)), Image.open(io.BytesIO(data))
    assert thumb.width < full.width and abs(thumb.width / thumb.height - full.width / full.height) < 0.02
    rel = f"pictures/compute_metrics/{KEY}/contact-sheet.png"
    assert store.fs.cat_file(store.abspath(rel)) == png, "the full-size PNG is kept in the store"
    assert f"`{store.url_of(rel)}`" in markdown, "the markdown says where the full-size PNG is"
    assert len(markdown) < 2 * EMBED_BYTES


def test_a_small_picture_is_embedded_as_is(store: ArtifactStore) -> None:
    png = contact_sheet(np.zeros((2, 8, 8, 3), np.uint8))
    markdown = picture_markdown(store, "compute_metrics", KEY, "small", png, Settings())
    assert embedded(markdown) == ("png", png) and "full-size" not in markdown


@pytest.mark.flow
def test_a_published_megabyte_picture_stays_under_prefects_event_limit(prefect_harness, store: ArtifactStore) -> None:
    """A keyed markdown artifact's text rides whole in one event, which the server drops over its limit."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES

    @flow(name="publish-contact-sheet")
    def publish() -> None:
        picture = picture_markdown(store, "compute_metrics", KEY, "contact-sheet", real_size_sheet(), Settings())
        publish_markdown("compute-metrics-big-sheet", f"### sheet\n\n{picture}")

    publish()
    with get_client(sync_client=True) as client:
        key = ArtifactFilterKey(any_=["compute-metrics-big-sheet"])
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=key))
    assert "data:image/jpeg;base64," in artifact.data
    # The event also carries ids and timestamps: keep well clear of the limit.
    assert len(artifact.data.encode()) < PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES.value() // 4
