"""REELFLOW_GPU_LIMIT: model stages hold a slot of a Prefect global concurrency limit."""

from __future__ import annotations

import time
import uuid

import pytest

from reelflow.flows.edit import edit_video
from reelflow.schemas.errors import SpecError
from reelflow.storage.store import ArtifactStore

pytestmark = pytest.mark.flow
TWO_ENCODES = "stages.encode_latents.each=[{chunk_size: 2}, {chunk_size: 3}]"


def create_limit(limit: int) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"gpu-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
    return name


def encode_intervals(manifest) -> list[tuple[float, float]]:
    store = ArtifactStore(manifest.store)
    spans = []
    for record in manifest.stages:
        if record.stage == "encode_latents":
            attrs = store.read_attrs(store.artifact_path(record.stage, record.key))
            spans.append((attrs["started_at"], attrs["completed_at"]))
    return sorted(spans)


@pytest.fixture
def slow_vae(monkeypatch):
    import reelflow.tasks.vae

    real = reelflow.tasks.vae.vae_encode

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(reelflow.tasks.vae, "vae_encode", slow)


def test_two_model_stages_overlap_without_a_limit_and_take_turns_with_one(make_spec, slow_vae, monkeypatch, tmp_path):
    free = encode_intervals(edit_video(make_spec(TWO_ENCODES, store=tmp_path / "free")))
    assert free[1][0] < free[0][1], "without a limit the two encodes run at once"

    monkeypatch.setenv("REELFLOW_GPU_LIMIT", create_limit(1))
    limited = encode_intervals(edit_video(make_spec(TWO_ENCODES, store=tmp_path / "limited")))
    assert limited[1][0] >= limited[0][1], "with one slot the second encode starts after the first finished"


def test_a_limit_the_server_lacks_is_refused_before_anything_runs(make_spec, monkeypatch) -> None:
    monkeypatch.setenv("REELFLOW_GPU_LIMIT", "no-such-limit")
    with pytest.raises(SpecError, match="prefect gcl create no-such-limit --limit 1"):
        edit_video(make_spec())
