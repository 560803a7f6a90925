"""estimate_flow through the stage seam: both backends store both directions with occlusion, resume by chunk,
and a clip of one frame is refused before any model loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reelflow.core.tiny import build_tiny_raft
from reelflow.flows.dag import plan_run
from reelflow.flows.edit import prepare_run
from reelflow.flows.sources import hash_sources, source_urls
from reelflow.schemas.calls import StoreSpec
from reelflow.schemas.errors import SpecError
from reelflow.schemas.loading import load_spec
from reelflow.schemas.settings import Settings
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import task_for


def flow_spec(clip: Path, method: str, raft: Path | None = None, *, frames: int = 5, **params):
    raw = {"name": "flow", "input": str(clip),
           "stages": [{"stage": "decode_video", "params": {"num_frames": frames, "width": 64, "height": 48}},
                      {"stage": "estimate_flow", "method": method, "params": params}]}  # fmt: skip
    if raft is not None:
        raw["models"] = {"raft": {"id": str(raft)}}
    return load_spec(raw)


def run(spec, store: str) -> dict:
    sources = hash_sources(spec, source_urls(spec), Settings())
    planned = plan_run(spec, sources=sources, store=StoreSpec(url=store), run_id="r", default_dtype="float32")
    return {p.id: task_for(p.call.stage).fn(call=p.call) for p in planned}


@pytest.mark.parametrize("method", ["farneback", "raft"])
def test_both_directions_and_occlusion_are_stored_per_pair(method: str, clip: Path, tmp_path: Path) -> None:
    raft = build_tiny_raft(tmp_path / "raft") if method == "raft" else None
    extra = {"num_flow_updates": 2} if method == "raft" else {}
    refs = run(flow_spec(clip, method, raft, batch_size=3, **extra), str(tmp_path / "store"))
    flow = ArtifactStore(str(tmp_path / "store")).open("estimate_flow", refs["estimate_flow"].key)
    assert flow["forward"].shape == flow["backward"].shape == (4, 2, 48, 64) and flow["forward"].dtype == np.float32
    assert flow["occluded_forward"].shape == (4, 48, 64) and flow["occluded_forward"].dtype == bool
    assert flow["pair_frames"][:].tolist() == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert flow.attrs["backend"] == ("opencv:farneback" if method == "farneback" else "torchvision:RAFT")
    assert np.isfinite(flow["forward"][:]).all() and np.abs(flow["forward"][:]).max() > 0


def test_a_one_frame_clip_is_refused_before_any_model_loads(clip: Path, tmp_path: Path) -> None:
    spec = load_spec(flow_spec(clip, "farneback", frames=1).model_dump(mode="json"), [f"store={tmp_path / 's'}"])
    with pytest.raises(SpecError, match="optical flow needs at least 2 frames; the clip has 1"):
        prepare_run(spec, Settings())


def test_a_torchvision_model_that_is_not_raft_is_refused(clip: Path, tmp_path: Path) -> None:
    import json

    raft = build_tiny_raft(tmp_path / "raft")
    config = json.loads((raft / "config.json").read_text())
    (raft / "config.json").write_text(json.dumps({**config, "architecture": "resnet18"}))
    spec = load_spec(flow_spec(clip, "raft", raft).model_dump(mode="json"), [f"store={tmp_path / 's'}"])
    with pytest.raises(SpecError, match="the flow role needs a RAFT .* names 'resnet18'"):
        prepare_run(spec, Settings())
