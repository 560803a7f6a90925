"""The artifact-store contract. Every backend runs the same tests by subclassing StoreContract."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from reelflow.schemas.errors import ArtifactIncomplete, ArtifactNotFound, LeaseHeld, StoreError
from reelflow.storage.gc import collect_garbage
from reelflow.storage.leases import Leases
from reelflow.storage.store import PARTS_DONE, ArtifactStore, locate_artifact_url

KEY_A = "a1" * 32
KEY_B = "b2" * 32
DIMS = ("frame", "channel", "y", "x")


def write_latents(store: ArtifactStore, key: str, frames: int = 5, run_id: str = "run-1") -> np.ndarray:
    data = np.random.default_rng(0).standard_normal((frames, 4, 8, 8)).astype(np.float32)
    with store.write("encode_latents", key, {"provenance": {"run_id": run_id, "key": key}}) as writer:
        writer.write_array("latents", data, dims=DIMS)
    return data


class StoreContract:
    """Subclasses provide ``store`` (an empty ArtifactStore)."""

    @pytest.fixture
    def store(self) -> ArtifactStore:
        raise NotImplementedError

    def test_write_then_read_round_trip_with_float16_and_dims(self, store: ArtifactStore) -> None:
        data = write_latents(store, KEY_A)
        group = store.open("encode_latents", KEY_A)
        stored = group["latents"]
        assert stored.dtype == np.float16
        assert tuple(stored.metadata.dimension_names) == DIMS
        np.testing.assert_allclose(stored[:], data, rtol=1e-3, atol=1e-3)
        assert group.attrs["complete"] is True
        assert group.attrs["provenance"]["run_id"] == "run-1"

    def test_any_zarr_v3_reader_opens_the_group_by_url(self, store: ArtifactStore) -> None:
        write_latents(store, KEY_A)
        url = store.url_of(store.artifact_path("encode_latents", KEY_A))
        group = zarr.open_group(url, mode="r", storage_options=store.storage_options or None)
        assert group.metadata.zarr_format == 3
        assert group["latents"].shape == (5, 4, 8, 8)

    def test_chunks_split_only_the_frame_axis(self, store: ArtifactStore) -> None:
        with store.write("encode_latents", KEY_A, {}) as writer:
            array = writer.create_array("latents", shape=(40, 4, 64, 64), dtype="float16", dims=DIMS)
        assert array.chunks[1:] == (4, 64, 64)
        assert 1 <= array.chunks[0] < 40

    def test_layout_is_content_addressed(self, store: ArtifactStore) -> None:
        write_latents(store, KEY_A)
        expected = f"artifacts/encode_latents/{KEY_A[:2]}/{KEY_A}.zarr"
        assert store.artifact_path("encode_latents", KEY_A) == expected
        assert store.fs.exists(store.abspath(expected) + "/zarr.json")

    def test_incomplete_until_the_block_ends(self, store: ArtifactStore) -> None:
        with store.write("encode_latents", KEY_A, {}) as writer:
            writer.write_array("latents", np.ones((2, 4, 8, 8), np.float32), dims=DIMS)
            assert not store.is_complete("encode_latents", KEY_A)
            with pytest.raises(ArtifactNotFound):
                store.open("encode_latents", KEY_A)
        assert store.is_complete("encode_latents", KEY_A)

    def test_failed_write_leaves_nothing_that_reads_as_complete(self, store: ArtifactStore) -> None:
        with pytest.raises(RuntimeError):
            with store.write("encode_latents", KEY_A, {}) as writer:
                writer.write_array("latents", np.ones((2, 4, 8, 8), np.float32), dims=DIMS)
                raise RuntimeError("boom")
        assert not store.is_complete("encode_latents", KEY_A)
        assert list(store.list()) == []
        assert store.temporaries() == []

    def test_reader_refuses_a_group_without_marker(self, store: ArtifactStore) -> None:
        write_latents(store, KEY_A)
        rel = store.artifact_path("encode_latents", KEY_A)
        meta_path = store.abspath(rel) + "/zarr.json"
        meta = json.loads(store.fs.cat_file(meta_path))
        meta["attributes"]["complete"] = False
        store.fs.pipe_file(meta_path, json.dumps(meta).encode())
        with pytest.raises(ArtifactIncomplete, match="never completed"):
            store.open("encode_latents", KEY_A)
        assert not store.is_complete("encode_latents", KEY_A)

    def test_rewrite_after_an_abandoned_write(self, store: ArtifactStore) -> None:
        writer_cm = store.write("encode_latents", KEY_A, {})
        writer = writer_cm.__enter__()
        writer.write_array("latents", np.zeros((2, 4, 8, 8), np.float32), dims=DIMS)
        # The process "dies" here: the context manager is never exited.
        data = write_latents(store, KEY_A)
        np.testing.assert_allclose(store.open("encode_latents", KEY_A)["latents"][:], data, atol=1e-2)

    def test_missing_artifact(self, store: ArtifactStore) -> None:
        with pytest.raises(ArtifactNotFound) as info:
            store.open("encode_latents", KEY_B)
        assert isinstance(info.value, FileNotFoundError)

    def test_ref_describes_arrays(self, store: ArtifactStore) -> None:
        write_latents(store, KEY_A, run_id="run-9")
        ref = store.ref("encode_latents", KEY_A)
        assert ref.key == KEY_A and ref.stage == "encode_latents" and ref.run_id == "run-9"
        assert ref.arrays["latents"].shape == (5, 4, 8, 8)
        assert ref.arrays["latents"].dims == DIMS
        assert ref.url.endswith(f"{KEY_A}.zarr")

    def test_list_and_find_by_prefix(self, store: ArtifactStore) -> None:
        write_latents(store, KEY_A)
        write_latents(store, KEY_B)
        assert sorted(i.key for i in store.list()) == [KEY_A, KEY_B]
        assert [i.key for i in store.list("encode_latents")] == [KEY_A, KEY_B]
        assert list(store.list("decode_video")) == []
        assert store.find(KEY_B[:8]).key == KEY_B
        with pytest.raises(ArtifactNotFound, match="no artifact"):
            store.find("cafe" * 4)
        with pytest.raises(ArtifactNotFound, match="not a stage key"):
            store.find("xyz")

    def test_url_round_trips_through_locate(self, store: ArtifactStore) -> None:
        write_latents(store, KEY_A)
        info = store.find(KEY_A)
        root, stage, key = locate_artifact_url(info.url)
        assert (stage, key) == ("encode_latents", KEY_A)
        assert ArtifactStore(root, store.storage_options).is_complete(stage, key)

    def test_leases_are_exclusive_and_expire(self, store: ArtifactStore) -> None:
        leases = Leases(store)
        assert leases.acquire(KEY_A, "one", ttl=30)
        assert not leases.acquire(KEY_A, "two", ttl=30)
        assert leases.acquire(KEY_A, "one", ttl=30)  # renewal by the holder
        leases.release(KEY_A, "two")  # not the holder: no effect
        assert leases.read(KEY_A).holder == "one"
        leases.release(KEY_A, "one")
        assert leases.acquire(KEY_A, "two", ttl=0.05)
        time.sleep(0.1)
        assert leases.acquire(KEY_A, "three", ttl=30), "an expired lease is taken over"
        assert leases.live_keys() == {KEY_A}

    def test_exactly_one_of_many_contenders_takes_a_free_lease(self, store: ArtifactStore) -> None:
        winners = _race(store, 8)
        assert len(winners) == 1 and Leases(store).read(KEY_A).holder == winners[0]

    def test_exactly_one_of_many_contenders_takes_over_an_expired_lease(self, store: ArtifactStore) -> None:
        leases = Leases(store)
        assert leases.acquire(KEY_A, "stalled", ttl=0.05)
        time.sleep(0.1)
        winners = _race(store, 8)
        assert len(winners) == 1 and leases.read(KEY_A).holder == winners[0]
        assert not leases.renew(KEY_A, "stalled", ttl=30), "the stalled holder learns that it lost the lease"
        leases.release(KEY_A, "stalled")
        assert leases.read(KEY_A).holder == winners[0], "and its release does not free the winner's lease"

    def test_gc_by_age_keeps_held_artifacts(self, store: ArtifactStore) -> None:
        write_latents(store, KEY_A)
        write_latents(store, KEY_B)
        Leases(store).hold("run-x", [KEY_A], ttl=60)
        report = collect_garbage(store, older_than=0.0)
        assert [store.find(KEY_A).key] == [KEY_A]
        assert report.kept_held == [store.artifact_path("encode_latents", KEY_A)]
        assert report.removed == [store.artifact_path("encode_latents", KEY_B)]
        assert not store.is_complete("encode_latents", KEY_B)

    def test_gc_dry_run_deletes_nothing(self, store: ArtifactStore) -> None:
        write_latents(store, KEY_A)
        report = collect_garbage(store, older_than=0.0, dry_run=True)
        assert report.removed and store.is_complete("encode_latents", KEY_A)

    def test_gc_by_size_removes_oldest_first(self, store: ArtifactStore) -> None:
        write_latents(store, KEY_A, frames=20)
        time.sleep(0.01)
        write_latents(store, KEY_B, frames=20)
        one = store.size(store.artifact_path("encode_latents", KEY_B))
        report = collect_garbage(store, max_bytes=one)
        assert report.removed == [store.artifact_path("encode_latents", KEY_A)]
        assert store.is_complete("encode_latents", KEY_B)
        assert report.remaining_bytes <= one

    def test_gc_sweeps_stale_unfinished_writes_only(self, store: ArtifactStore) -> None:
        abandoned = store.write("encode_latents", KEY_A, {})
        abandoned.__enter__().write_array("latents", np.ones((2, 4, 8, 8), np.float32), dims=DIMS)
        assert collect_garbage(store, stale_after=3600).removed == []
        report = collect_garbage(store, stale_after=-1)
        assert len(report.removed) == 1
        assert store.temporaries() == [] and list(store.list()) == []

    def test_gc_never_sweeps_a_write_under_a_live_lease(self, store: ArtifactStore) -> None:
        Leases(store).acquire(KEY_A, "writer", ttl=60)
        abandoned = store.write("encode_latents", KEY_A, {})
        abandoned.__enter__().write_array("latents", np.ones((2, 4, 8, 8), np.float32), dims=DIMS)
        assert collect_garbage(store, stale_after=-1).removed == []


    def test_a_resumable_write_keeps_its_parts_after_a_failure_and_resumes_them(self, store: ArtifactStore) -> None:
        data = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
        with pytest.raises(RuntimeError, match="killed"):
            with store.write("encode_latents", KEY_A, {"provenance": {"key": KEY_A}}, resumable=True) as writer:
                array = writer.create_array("latents", shape=(4, 3), dtype="float32", dims=("frame", "x"))
                for part in range(2):
                    array[part] = data[part]
                    writer.mark_done(f"part-{part}")
                raise RuntimeError("killed after two parts")
        assert not store.is_complete("encode_latents", KEY_A)
        with pytest.raises(ArtifactNotFound):
            store.open("encode_latents", KEY_A)

        with store.write("encode_latents", KEY_A, {"provenance": {"key": KEY_A}}, resumable=True) as writer:
            assert writer.resumed_parts == ("part-0", "part-1")
            array = writer.create_array("latents", shape=(4, 3), dtype="float32", dims=("frame", "x"))
            computed = []
            for part in range(4):
                if not writer.is_done(f"part-{part}"):
                    array[part] = data[part]
                    writer.mark_done(f"part-{part}")
                    computed.append(part)
        assert computed == [2, 3]
        group = store.open("encode_latents", KEY_A)
        np.testing.assert_array_equal(group["latents"][:], data)
        assert group.attrs[PARTS_DONE] == ["part-0", "part-1", "part-2", "part-3"]
        assert store.temporaries() == []

    def test_a_plain_write_after_a_resumable_failure_starts_over(self, store: ArtifactStore) -> None:
        with pytest.raises(RuntimeError):
            with store.write("encode_latents", KEY_A, {"provenance": {"key": KEY_A}}, resumable=True) as writer:
                writer.create_array("stale", shape=(2,), dtype="float32", dims=("x",))
                writer.mark_done("part-0")
                raise RuntimeError("killed")
        with store.write("encode_latents", KEY_A, {"provenance": {"key": KEY_A}}) as writer:
            assert writer.resumed_parts == () and not writer.resumable
            assert "stale" not in writer.group
            with pytest.raises(ValueError, match="resumable"):
                writer.mark_done("x")
        group = store.open("encode_latents", KEY_A)
        assert "stale" not in group and PARTS_DONE not in group.attrs

    def test_a_stalled_attempt_stops_writing_once_another_reopened_its_partial(self, store: ArtifactStore) -> None:
        stalled = store.write("encode_latents", KEY_A, {"provenance": {"key": KEY_A}}, resumable=True)
        first = stalled.__enter__()
        first.mark_done("part-0")
        with store.write("encode_latents", KEY_A, {"provenance": {"key": KEY_A}}, resumable=True) as second:
            assert second.resumed_parts == ("part-0",)
            second.mark_done("part-1")
            with pytest.raises(LeaseHeld, match="another attempt took over"):
                first.mark_done("part-2")
        assert store.open("encode_latents", KEY_A).attrs[PARTS_DONE] == ["part-0", "part-1"]
        with pytest.raises(LeaseHeld):
            stalled.__exit__(None, None, None)  # its commit is refused too
        assert store.is_complete("encode_latents", KEY_A)

    def test_gc_keeps_a_recently_touched_partial_and_sweeps_a_stale_one(self, store: ArtifactStore) -> None:
        with pytest.raises(RuntimeError):
            with store.write("encode_latents", KEY_A, {"provenance": {"key": KEY_A}}, resumable=True) as writer:
                writer.mark_done("part-0")
                raise RuntimeError("killed")
        assert collect_garbage(store, stale_after=3600).removed == []
        removed = collect_garbage(store, stale_after=0).removed
        assert len(removed) == 1 and KEY_A in removed[0]


    def test_a_missing_store_is_refused_and_not_created(self, store: ArtifactStore) -> None:
        write_latents(store, KEY_A)
        store.ensure_exists()
        missing = ArtifactStore(f"{store.url}-typo", store.storage_options)
        with pytest.raises(StoreError, match=r"store '.*-typo' does not exist; check --store or REELFLOW_STORE"):
            missing.ensure_exists()
        assert not missing.fs.exists(missing.root)


class TestLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> ArtifactStore:
        store = ArtifactStore(str(tmp_path / "store"))
        store.ensure_reachable()
        assert store.atomic_rename
        return store

    def test_file_url_is_the_same_local_store(self, tmp_path: Path) -> None:
        store = ArtifactStore(f"file://{tmp_path}/store")
        assert store.atomic_rename and store.url == str(tmp_path / "store")

    def test_writes_go_to_a_temporary_sibling_then_rename(self, store: ArtifactStore) -> None:
        with store.write("encode_latents", KEY_A, {}) as writer:
            assert ".zarr.tmp-" in writer.path
            assert len(store.temporaries()) == 1
        assert store.temporaries() == []

    def test_unwritable_root_is_a_clear_error(self, tmp_path: Path) -> None:
        from reelflow.schemas.errors import StoreError

        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        with pytest.raises(StoreError, match="not writable.*REELFLOW_STORE"):
            ArtifactStore(str(blocker / "store")).ensure_reachable()


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self, memory_url: str) -> ArtifactStore:
        store = ArtifactStore(memory_url)
        store.ensure_reachable()
        assert not store.atomic_rename
        return store

    def test_writes_in_place_with_marker_as_commit(self, store: ArtifactStore) -> None:
        with store.write("encode_latents", KEY_A, {}) as writer:
            assert writer.path.endswith(f"{KEY_A}.zarr")
            assert not store.is_complete("encode_latents", KEY_A)
        assert store.is_complete("encode_latents", KEY_A)


def test_a_lease_whose_process_died_is_taken_over_at_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    store = ArtifactStore(str(tmp_path / "store"))
    code = (
        "import sys; from storage.store import ArtifactStore; from storage.leases import Leases; "
        f"Leases(ArtifactStore(sys.argv[1])).acquire('{KEY_A}', 'dead-run', ttl=600)"
    )
    subprocess.run([sys.executable, "-c", code, store.url], check=True)
    leases = Leases(store)
    assert leases.read(KEY_A).holder == "dead-run"
    assert not leases.read(KEY_A).live(), "the holder's process has exited"
    assert leases.acquire(KEY_A, "next-run", ttl=60)


def _race(store: ArtifactStore, contenders: int) -> list[str]:
    import threading

    leases = Leases(store)
    winners: list[str] = []
    start = threading.Barrier(contenders)

    def contend(name: str) -> None:
        start.wait()
        if leases.acquire(KEY_A, name, ttl=30):
            winners.append(name)

    threads = [threading.Thread(target=contend, args=(f"run-{i}",)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return winners


class TestS3Store(StoreContract):
    @pytest.fixture
    def store(self, s3_server) -> ArtifactStore:
        import uuid

        endpoint, client = s3_server
        bucket = f"reelflow-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        options = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
        store = ArtifactStore(f"s3://{bucket}/store", options)
        store.fs.invalidate_cache()
        store.ensure_reachable()
        assert not store.atomic_rename
        return store
