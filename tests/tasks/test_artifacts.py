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
from reelflow.tasks.artifacts import EMBED_BYTES, card_key, clip_label, contact_sheet, picture_markdown, publish_markdown, resolve_pictures

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
    assert len(png) > 2 * 2**20
    markdown = resolve_pictures(picture_markdown(store, "compute_metrics", KEY, "contact-sheet", png), store, Settings())

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
    markdown = resolve_pictures(picture_markdown(store, "compute_metrics", KEY, "small", png), store, Settings())
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
        picture = resolve_pictures(picture_markdown(store, "compute_metrics", KEY, "contact-sheet", real_size_sheet()), store,
                                   Settings())  # fmt: skip
        publish_markdown("compute-metrics-big-sheet", f"### sheet\n\n{picture}")

    publish()
    with get_client(sync_client=True) as client:
        key = ArtifactFilterKey(any_=["compute-metrics-big-sheet"])
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(key=key))
    assert "data:image/jpeg;base64," in artifact.data
    # The event also carries ids and timestamps: keep well clear of the limit.
    assert len(artifact.data.encode()) < PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES.value() // 4


def test_a_picture_is_kept_by_its_place_in_the_store_and_linked_when_published(store: ArtifactStore) -> None:
    png = contact_sheet(np.zeros((2, 8, 8, 3), np.uint8))
    kept = picture_markdown(store, "compute_metrics", KEY, "small", png)
    assert kept == f"![small](picture:pictures/compute_metrics/{KEY}/small.png)"  # no URL that could expire
    served = resolve_pictures(kept, store, Settings(pictures_url="http://pictures:8765"))
    url = f"http://pictures:8765/compute_metrics/{KEY}/small.png"
    assert f"![small]({url})" in served and f"[small at full size]({url})" in served
    store.fs.rm(store.abspath(f"pictures/compute_metrics/{KEY}/small.png"))
    assert "is missing" in resolve_pictures(kept, store, Settings())


def test_card_keys_name_clip_pipeline_and_stage_and_sort_in_pipeline_order() -> None:
    from reelflow.schemas.calls import StageCall, StoreSpec
    from reelflow.schemas.stages import DecodeVideo, EncodeVideo

    def call(stage, position: int, clip: str = "intro-0a1b2c") -> StageCall:  # noqa: ANN001
        return StageCall(pipeline="fatezero-local", stage=stage, key=KEY, store=StoreSpec(url="memory://x"), run_id="r",
                         clip=clip, position=position)  # fmt: skip

    first, last = card_key(call(DecodeVideo(id="decode_video"), 0)), card_key(call(EncodeVideo(id="encode_video"), 11))
    assert (first, last) == ("intro-0a1b2c-fatezero-local-01-decode-video", "intro-0a1b2c-fatezero-local-12-encode-video")
    long = card_key(call(EncodeVideo(id="encode_video"), 3, clip="a-very-long-clip-name-" * 8 + "0a1b2c"))
    assert len(long) <= 100 and long.endswith("-fatezero-local-04-encode-video")


def test_progress_logs_every_tenth_and_shows_rate_and_time_left_in_the_card(monkeypatch: pytest.MonkeyPatch) -> None:
    import reelflow.tasks.progress as progress_module

    logged, shown = [], []
    monkeypatch.setattr(progress_module, "get_run_logger", lambda: type("L", (), {"info": lambda self, *a: logged.append(a)})())
    card = type("Card", (), {"show": lambda self, markdown: shown.append(markdown)})()
    progress = progress_module.Progress(card, title="### card", description="clip reconstruct invert", min_interval=0.0)
    progress._enabled = True  # as inside a task run
    progress.start(50, unit="steps")
    for _ in range(50):
        progress.advance()
    assert len(logged) == 10  # 50 steps, one line per tenth, not per step
    assert shown[0] == "### card\n\n**running**: 0/50 steps (0%)" and len(shown) == 51
    assert re.fullmatch(r"### card\n\n\*\*running\*\*: 50/50 steps \(100%\), [0-9.e+]+ steps/s, about 0 s left", shown[-1])


def test_text_that_looks_like_a_picture_never_reads_outside_the_pictures(store: ArtifactStore) -> None:
    for rel in ("../../secrets.txt", "artifacts/x/y.zarr/zarr.json", "pictures/../leases/k.json"):
        assert "not a picture of the store" in resolve_pictures(f"![x](picture:{rel})", store, Settings())


def test_a_long_clip_name_is_shortened_but_keeps_its_url_hash() -> None:
    from reelflow.schemas.calls import StageCall, StoreSpec
    from reelflow.schemas.stages import DecodeVideo

    keys = {card_key(StageCall(pipeline="reconstruct", stage=DecodeVideo(id="decode_video"), key=KEY, run_id="r",
                                store=StoreSpec(url="memory://x"), clip=clip_label(f"s3://b/{folder}/{'x' * 100}.mp4")))
            for folder in ("a", "c")}  # fmt: skip
    assert len(keys) == 2 and all(len(k) <= 100 and k.endswith("-reconstruct-01-decode-video") for k in keys)


def test_a_contact_sheet_wraps_at_four_columns_with_labels_and_a_colour_key() -> None:
    frames = np.zeros((6, 32, 48, 3), np.uint8)
    plain = Image.open(io.BytesIO(contact_sheet(frames[:2])))
    sheet = Image.open(io.BytesIO(contact_sheet(frames, rows=[np.ones((6, 32, 48), np.float32)], labels=["a"] * 6)))
    tile_w, tile_h = 48 * 2, 32 * 2  # small frames scaled up by a whole factor to at least 96 px a side
    assert plain.size == (3 + 2 * (tile_w + 3), 3 + tile_h + 3)
    # two blocks (4 + 2 frames) of a label line and two rows of tiles, then the colour key
    assert sheet.size == (3 + 4 * (tile_w + 3), 2 * (16 + 3 + 2 * (tile_h + 3)) + 26)
