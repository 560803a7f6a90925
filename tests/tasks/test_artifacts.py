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
from reelflow.tasks.artifacts import (EMBED_BYTES, card_key, clip_label, contact_sheet, latent_view, overlay, picture_markdown,
                                      publish_markdown, resolve_pictures)
from reelflow.tasks.views import StepStrip

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


def test_row_names_and_a_stated_key_add_their_bands_to_the_sheet() -> None:
    frames = np.zeros((2, 32, 48, 3), np.uint8)
    plain = Image.open(io.BytesIO(contact_sheet(frames, rows=[frames])))
    named = Image.open(io.BytesIO(contact_sheet(frames, rows=[frames], row_labels=["source", "overlay"], key="attention")))
    assert named.size == (plain.width, plain.height + 2 * 18 + 26)


def test_an_overlay_keeps_the_frame_where_the_map_is_zero_and_heats_it_where_one() -> None:
    frames = np.full((1, 8, 8, 3), 100, np.uint8)
    maps = np.zeros((1, 2, 2), np.float32)
    maps[0, 1, 1] = 1.0  # the bottom-right cell, a quarter of the frame after nearest scaling
    drawn = overlay(frames, maps, alpha=0.5)
    assert (drawn[0, :4, :4] == 50).all(), "0 is black in the key: the frame dimmed by alpha"
    assert (drawn[0, 4:, 4:] == round(0.5 * 100 + 0.5 * 255)).all(), "1 is white"


def test_the_latent_view_colours_by_principal_component_for_any_channel_count() -> None:
    ramp = np.tile(np.linspace(-1, 1, 16, dtype=np.float32), (16, 1))
    noise = np.random.default_rng(0).normal(0, 0.01, (16, 16, 16)).astype(np.float32)
    latents = noise.copy()
    latents[:4] += ramp  # 16 channels (Wan's count), the strongest direction (1, 1, 1, 1, 0, ...) a ramp along x
    view = latent_view(latents[None])
    assert view.shape == (1, 16, 16, 3) and view.dtype == np.uint8
    red = np.median(view[0, :, :, 0], axis=0)
    assert (np.diff(red) >= 0).all() and red[-1] - red[0] > 200, "the first component, red, follows the ramp"
    assert latent_view(latents[None, :2]).shape == (1, 16, 16, 3), "fewer than three channels are padded"


def test_a_step_strip_keeps_the_middle_frame_of_a_few_spread_steps_of_the_first_window(store: ArtifactStore) -> None:
    strip = StepStrip()
    assert strip.markdown(lambda name, png: name) is None, "nothing kept, nothing shown"
    strip.start(20, "denoising")
    for window, first in ((3, 5), (1, 0)):  # window 3 computed first, resumed at step 5; then window 1 from the start
        strip.start(20, "second window")  # a later window's start changes nothing
        for step in range(first, 20):
            latents = np.full((1, 5, 4, 2, 2), 100.0 * window + step + np.arange(5)[:, None, None, None])
            strip.keep(step, latents, f"step {step}", part=window)
    assert sorted(strip.kept) == [8, 11, 15, 19], "only the first part computed, never mixed with another window"
    label, frame = strip.kept[8]
    assert label == "step 8" and frame.shape == (4, 2, 2) and (frame == 300 + 8 + 2).all(), "the middle frame"
    shown = strip.markdown(lambda name, png: f"<{name}:{Image.open(io.BytesIO(png)).width}>")
    assert shown.startswith("**denoising**") and "<steps:" in shown


def test_links_to_files_of_the_pictures_open_where_served_and_name_the_store_otherwise(store: ArtifactStore) -> None:
    text = f"[summary as JSON](picture:pictures/invert_latents/{KEY}/summary.json)"
    served = resolve_pictures(text, store, Settings(pictures_url="http://pictures:8765"))
    assert served == f"[summary as JSON](http://pictures:8765/invert_latents/{KEY}/summary.json)"
    named = resolve_pictures(text, store, Settings())
    assert named == f"summary as JSON: `{store.abspath(f'pictures/invert_latents/{KEY}/summary.json')}`"
    assert "not a file of the store" in resolve_pictures("[x](picture:pictures/../leases/k.json)", store, Settings())


def test_stage_tasks_retry_after_a_number_of_seconds_the_ui_can_show() -> None:
    from reelflow.tasks.stage import TASKS, load_implementations

    load_implementations()
    assert {task.retry_delay_seconds for task in TASKS.values()} == {2}


def test_a_large_picture_of_a_stage_is_kept_as_a_jpeg_of_the_same_size(store: ArtifactStore) -> None:
    from reelflow.schemas.calls import StageCall, StoreSpec
    from reelflow.schemas.stages import DecodeVideo
    from reelflow.tasks.runtime import StageContext

    call = StageCall(pipeline="p", stage=DecodeVideo(id="decode_video"), key=KEY, store=StoreSpec(url=store.url), run_id="r")
    ctx = StageContext(call, store, writer=None, progress=None, settings=Settings())  # type: ignore[arg-type]
    big = real_size_sheet()
    assert ctx.picture("sheet", big) == f"![sheet](picture:pictures/decode_video/{KEY}/sheet.jpeg)"
    kept = Image.open(io.BytesIO(store.fs.cat_file(store.abspath(f"pictures/decode_video/{KEY}/sheet.jpeg"))))
    assert kept.format == "JPEG" and kept.size == Image.open(io.BytesIO(big)).size
    small = contact_sheet(np.zeros((2, 8, 8, 3), np.uint8))
    assert ctx.picture("small", small).endswith("/small.png)"), "small pictures stay lossless"
