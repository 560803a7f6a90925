"""The attention store: streamed writes, chunking, prefetching reads, errors surfacing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from reelflow.storage.attention import AttentionReader, AttentionWriter, StoredTokens
from reelflow.storage.store import ArtifactStore

KEY = "c3" * 32


def maps(step: int) -> np.ndarray:
    return np.random.default_rng(step).random((3, 2, 16, 16)).astype(np.float32)


def write_steps(store: ArtifactStore, steps: list[int]) -> None:
    with store.write("invert_latents", KEY, {}) as writer:
        attention = AttentionWriter(writer, num_steps=5, queue_size=2)
        for step in steps:
            attention.write(step, "layer.attn1", False, maps(step))
            attention.write(step, "layer.attn2", True, maps(step + 10)[..., :7])
        attention.close()
        assert attention.layers["layer.attn2"] == {"is_cross": True, "query_len": 16, "shape": [3, 2, 16, 7], "stored": "maps"}
        assert attention.raw_bytes == len(steps) * (3 * 2 * 16 * 16 + 3 * 2 * 16 * 7) * 4


def test_maps_round_trip_as_float16_one_chunk_per_step(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    write_steps(store, [2, 3, 4])
    group = store.open("invert_latents", KEY)
    array = group["attention/layer.attn1"]
    assert array.shape == (5, 3, 2, 16, 16) and array.chunks == (1, 3, 2, 16, 16) and array.dtype == np.float16
    assert array.nchunks_initialized == 3
    recorded = {"layer.attn1": [2, 3, 4], "layer.attn2": [2, 3, 4]}
    with AttentionReader(group, recorded, order=[4, 3, 2]) as reader:
        for step in (4, 3, 2):
            got = reader(step)
            np.testing.assert_allclose(got["layer.attn1"], maps(step), atol=1e-3)
            assert got["layer.attn2"].shape == (3, 2, 16, 7)


def test_reading_an_unrecorded_step_is_an_error_not_zeros(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    write_steps(store, [3, 4])
    with AttentionReader(store.open("invert_latents", KEY), {"layer.attn1": [3, 4]}, order=[4, 3]) as reader:
        with pytest.raises(KeyError, match="step 1 was not recorded"):
            reader(1)


def test_a_step_returns_only_the_layers_recorded_at_it(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    write_steps(store, [2, 3, 4])
    recorded = {"layer.attn1": [4], "layer.attn2": [2, 3, 4]}
    with AttentionReader(store.open("invert_latents", KEY), recorded, order=[4, 3, 2]) as reader:
        assert set(reader(4)) == {"layer.attn1", "layer.attn2"}
        assert set(reader(3)) == {"layer.attn2"}


def test_the_next_step_is_prefetched(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    write_steps(store, [2, 3, 4])
    with AttentionReader(store.open("invert_latents", KEY), {"layer.attn1": [2, 3, 4]}, order=[4, 3, 2]) as reader:
        reader(4)
        assert set(reader._pending) == {3}
        time.sleep(0.2)
        assert reader._pending[3].done()


def test_a_write_error_reaches_the_producer_and_discards_the_artifact(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    with pytest.raises(Exception):
        with store.write("invert_latents", KEY, {}) as writer:
            attention = AttentionWriter(writer, num_steps=2)
            attention.write(5, "layer.attn1", False, maps(0))  # step 5 of a 2-step array
            attention.close()
    assert not store.is_complete("invert_latents", KEY) and store.temporaries() == []


def test_abort_stops_the_writer_thread(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    with store.write("invert_latents", KEY, {}) as writer:
        attention = AttentionWriter(writer, num_steps=5)
        attention.write(0, "layer.attn1", False, maps(0))
        attention.abort()
        assert not attention._thread.is_alive()


def test_self_attention_tokens_round_trip_with_their_key_frames(tmp_path: Path) -> None:
    """Queries of every frame and keys of the key frames only, each one chunk per step; never a map."""
    store = ArtifactStore(str(tmp_path))
    rng = np.random.default_rng(0)
    tokens = {step: StoredTokens(rng.standard_normal((3, 2, 16, 8)), rng.standard_normal((2, 2, 16, 8)), [0, 1],
                                 [[0, 1], [1, 1], [2, 1]]) for step in (3, 4)}  # fmt: skip
    with store.write("invert_latents", KEY, {}) as writer:
        attention = AttentionWriter(writer, num_steps=5)
        for step, recorded in tokens.items():
            attention.write(step, "layer.attn1", False, recorded)
        attention.close()
    group = store.open("invert_latents", KEY)
    assert "attention" not in group
    queries, keys = group["queries/layer.attn1"], group["keys/layer.attn1"]
    assert queries.shape == (5, 3, 2, 16, 8) and keys.shape == (5, 2, 2, 16, 8) and queries.nchunks_initialized == 2
    assert tuple(keys.metadata.dimension_names) == ("step", "key_frame_2", "head_2", "token_16", "channel_8")
    assert queries.attrs["stored"] == "tokens" and queries.attrs["frame_indices"] == [[0, 1], [1, 1], [2, 1]]
    with AttentionReader(group, {"layer.attn1": [3, 4]}, order=[4, 3]) as reader:
        got = reader(4)["layer.attn1"]
    assert isinstance(got, StoredTokens) and got.key_frames == [0, 1]
    np.testing.assert_allclose(got.query, tokens[4].query, atol=2e-3)
    np.testing.assert_allclose(got.key, tokens[4].key, atol=2e-3)


def test_records_of_a_bfloat16_model_are_stored_as_float16(tmp_path: Path) -> None:
    import torch

    from reelflow.tasks.fatezero import _to_store

    store = ArtifactStore(str(tmp_path))
    maps16 = torch.rand(3, 2, 16, 7).to(torch.bfloat16)
    with store.write("invert_latents", KEY, {}) as writer:
        attention = AttentionWriter(writer, num_steps=1)
        attention.write(0, "layer.attn2", True, _to_store(maps16))
        attention.close()
    stored = store.open("invert_latents", KEY)["attention/layer.attn2"][0]
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored, maps16.float().numpy(), atol=1e-2)
