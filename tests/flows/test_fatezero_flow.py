"""FateZero end to end on tiny models: invert once, edit many, and what the attention store holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reelflow.deployments import spec_path
from reelflow.flows.edit import edit_video
from reelflow.schemas.errors import GraphError
from reelflow.schemas.loading import load_spec
from reelflow.storage.store import ArtifactStore

pytestmark = pytest.mark.flow
STEPS = 4

TINY = (
    "stages.decode_video.params.num_frames=3",
    "stages.decode_video.params.width=64",
    "stages.decode_video.params.height=64",
    "stages.decode_video.params.multiple=8",
    f"stages.invert_latents.params.num_steps={STEPS}",
    "stages.invert_latents.params.min_channels=0",
    "stages.invert_latents.params.source_prompt=a cat walking on a street",
    "stages.denoise_latents.params.target_prompt=a painting of a cat walking on a street",
    "stages.denoise_latents.params.reweight={painting: 10}",
    "stages.encode_video.params.preset=ultrafast",
)
SECOND_EDIT = "{target_prompt: a dog walking on a street, blend_words: [[cat], [dog]], blend_latents: true, reweight: {}}"


@pytest.fixture
def fatezero_spec(tiny_bundle: Path, clip: Path, tmp_path: Path):
    def make(*overrides: str):
        paths = (f"models.sd.id={tiny_bundle}", f"input={clip}", f"store={tmp_path / 'store'}", f"output={tmp_path / 'out'}")
        return load_spec(spec_path("fatezero-style"), [*paths, *TINY, *overrides])

    return make


def statuses(manifest) -> dict[str, str]:
    return {r.name: r.status for r in manifest.stages}


def test_a_second_target_prompt_reuses_the_inversion(fatezero_spec) -> None:
    first = edit_video(fatezero_spec("stages.denoise_latents.each=[{}]"))
    assert set(statuses(first).values()) == {"computed"}
    check_card_views(first)
    both = edit_video(fatezero_spec(f"stages.denoise_latents.each=[{{}}, {SECOND_EDIT}]"))
    status = statuses(both)
    assert status["invert_latents"] == status["denoise_latents_0"] == status["encode_video_0"] == "cached"
    assert status["denoise_latents_1"] == status["encode_video_1"] == "computed"
    videos = {name: Path(url).name for name, url in both.outputs.items() if name.startswith("encode_video")}
    assert videos == {
        "encode_video_0": "clip.fatezero-style.encode_video_0.mp4",
        "encode_video_1": "clip.fatezero-style.encode_video_1.mp4",
    }
    store = ArtifactStore(both.store)
    local = store.open("denoise_latents", next(r.key for r in both.stages if r.name == "denoise_latents_1"))
    mask = local["blend_mask"][:]
    assert mask.shape[0] == 3 and set(mask.ravel()) <= {0, 1}
    assert (mask.reshape(3, -1).max(axis=1) == 1).all(), "each frame's peak of the normalised map passes 0.3"
    assert local["word_heatmaps"].shape[:2] == (1, 3) and local["word_heatmaps"].attrs["words"] == ["cat"]
    assert local.attrs["fusion"] == "refine"
    # What the card shows is in the store too: each side's words summed over the fused steps.
    assert local["source_word_maps"].attrs["words"] == ["cat"] and local["target_word_maps"].attrs["words"] == ["dog"]
    assert local["target_word_maps"].shape == (1, 3, *mask.shape[1:])
    style = store.open("denoise_latents", next(r.key for r in both.stages if r.name == "denoise_latents_0"))
    assert "blend_mask" not in style and style["target_word_maps"].attrs["words"] == ["painting", "of"], (
        "a style edit shows the words the target prompt adds")


def check_card_views(manifest) -> None:  # noqa: ANN001
    """Every stage keeps its card, views, summary and output in the store."""
    store = ArtifactStore(manifest.store)
    kept = {r.name: {p.name for p in (Path(manifest.store) / "pictures" / r.stage / r.key).iterdir()} for r in manifest.stages}
    assert {"card.md", "summary.json"} <= set.intersection(*kept.values())
    assert {"frames.png"} <= kept["decode_video"] and {"frames.png", "preview.webp"} <= kept["decode_latents_0"]
    assert {"latents.png"} <= kept["encode_latents"]
    assert {"steps.png"} <= kept["invert_latents"] and {"steps.png", "attention.png", "latents.png"} <= kept["denoise_latents_0"]
    record = next(r for r in manifest.stages if r.name == "encode_video_0")
    copy = Path(manifest.store) / "pictures" / "encode_video" / record.key / "output.mp4"
    assert copy.read_bytes() == Path(manifest.outputs["encode_video_0"]).read_bytes(), "the browser's copy is the output"
    card = (copy.parent / "card.md").read_text()
    assert f"(picture:pictures/encode_video/{record.key}/output.mp4)" in card
    inversion = next(r for r in manifest.stages if r.name == "invert_latents")
    summary = json.loads((Path(manifest.store) / "pictures" / "invert_latents" / inversion.key / "summary.json").read_text())
    group = store.open("invert_latents", inversion.key)
    assert summary["arrays"]["latents"]["shape"] == list(group["latents"].shape)
    assert any(name.startswith("attention/") for name in summary["arrays"]), "the attention store's arrays too"
    assert summary["attrs"]["provenance"]["run_id"] and summary["stored_bytes"] == store.size(
        store.artifact_path("invert_latents", inversion.key))


def test_the_attention_store_holds_one_chunk_per_recorded_step_and_layer(fatezero_spec) -> None:
    spec = fatezero_spec("stages.denoise_latents.each=[{}]", "stages.invert_latents.params.record_fraction=0.5",
                         "stages.invert_latents.params.record_self_fraction=0.25",
                         "stages.denoise_latents.params.cross_replace_steps=0.5",
                         "stages.denoise_latents.params.self_replace_steps=0.25")  # fmt: skip
    manifest = edit_video(spec)
    store = ArtifactStore(manifest.store)
    inversion = store.open("invert_latents", next(r.key for r in manifest.stages if r.name == "invert_latents"))
    assert inversion.attrs["recorded_steps"] == inversion.attrs["recorded_cross_steps"] == [2, 3]
    assert inversion.attrs["recorded_self_steps"] == [3], "self maps only where the edit fuses self-attention"
    assert inversion["latents"].shape == (STEPS + 1, 3, 4, 8, 8)
    layers = inversion.attrs["layers"]
    assert sum(name.endswith("attn1") for name in layers) == sum(name.endswith("attn2") for name in layers) > 0
    for name, info in layers.items():
        if info["is_cross"]:  # maps (F, H, Nq, 77)
            array = inversion[f"attention/{name}"]
            assert info["stored"] == "maps" and array.shape == (STEPS, *info["shape"]) and info["shape"][-1] == 77
        else:  # the queries of every frame and the keys of the key frame ('mid',): never the Nq x Nk maps
            array, keys = inversion[f"queries/{name}"], inversion[f"keys/{name}"]
            frames, heads, query_len, channels = info["shape"]
            assert info["stored"] == "tokens" and info["key_frames"] == [1] and info["frame_indices"] == [[1]] * 3
            assert keys.shape == (STEPS, 1, heads, query_len, channels) and keys.nchunks_initialized == 1
            assert f"attention/{name}" not in inversion
        assert array.dtype == "float16" and array.chunks == (1, *info["shape"])
        assert array.nchunks_initialized == (2 if info["is_cross"] else 1)
        assert info["query_len"] <= 1024
    report = inversion.attrs["attention_store"]
    assert 0 < report["stored_bytes"] < report["raw_float32_bytes"]


def test_edit_windows_beyond_the_recorded_steps_are_refused_before_running(fatezero_spec) -> None:
    with pytest.raises(GraphError, match="set invert_latents.params.record_fraction to at least 0.8"):
        fatezero_spec("stages.invert_latents.params.record_fraction=0.5")
    with pytest.raises(GraphError, match="set invert_latents.params.record_self_fraction to at least 0.8"):
        fatezero_spec("stages.invert_latents.params.record_self_fraction=0.5")
    blend = "stages.denoise_latents.each=[{target_prompt: a dog walking, blend_words: [[cat], [dog]], reweight: {}, " \
            "cross_replace_steps: 0.2, self_replace_steps: 0.6}]"
    base = ("stages.denoise_latents.params.cross_replace_steps=0.2", "stages.denoise_latents.params.self_replace_steps=0.2")
    with pytest.raises(GraphError, match="'denoise_latents_0': its windows need cross-attention maps for 0.6"):
        fatezero_spec("stages.invert_latents.params.record_fraction=0.5", *base, blend)


def test_an_inversion_stored_by_the_previous_version_is_never_read_as_this_one(
    fatezero_spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 1 stored self-attention maps; version 2 stores queries and keys. Their keys differ, and an
    artifact whose attrs lack what version 2 reads is refused by name, not misread."""
    from reelflow.flows.dag import plan_run
    from reelflow.flows.sources import hash_sources, source_urls
    from reelflow.schemas.calls import StoreSpec
    from reelflow.schemas.errors import ArtifactMismatch
    from reelflow.schemas.fatezero import InvertLatents
    from reelflow.schemas.settings import Settings
    from reelflow.tasks import task_for

    spec = fatezero_spec("stages.denoise_latents.each=[{}]")

    def planned():
        sources = hash_sources(spec, source_urls(spec), Settings())
        return {p.id: p for p in plan_run(spec, sources=sources, store=StoreSpec(url=spec.store), run_id="r", default_dtype="float32")}

    current = planned()
    monkeypatch.setattr(InvertLatents, "version", "1")
    assert planned()["invert_latents"].key != current["invert_latents"].key
    monkeypatch.undo()

    store = ArtifactStore(spec.store)
    old_layers = {"up.attn1": {"is_cross": False, "query_len": 64, "shape": [3, 4, 64, 64]}}  # version 1: maps, no `stored`
    attrs = {"source_prompt": "a cat", "num_steps": STEPS, "timesteps": [1, 251, 501, 751], "recorded_steps": [3],
             "recorded_cross_steps": [3], "recorded_self_steps": [3], "frame_keys": ["mid"], "min_channels": 0,
             "layers": old_layers}  # fmt: skip
    with store.write("invert_latents", current["invert_latents"].key, {"provenance": {}}) as writer:
        writer.write_array("latents", np.zeros((STEPS + 1, 3, 4, 8, 8), np.float32), dims=("level", "frame", "c", "y", "x"))
        writer.update_attrs(attrs)
    edit = current["denoise_latents_0"].call
    with pytest.raises(ArtifactMismatch, match="first at layers.up.attn1.stored.*remove it and rerun"):
        task_for(edit.stage).fn(call=edit)
