"""The Dask task runner option: an edit's stages run on a local Dask cluster's worker processes."""

from __future__ import annotations

import pytest

from reelflow.flows.edit import edit_video_with_settings
from reelflow.flows.runners import task_runner
from reelflow.schemas.errors import SpecError
from reelflow.schemas.settings import Settings

pytestmark = pytest.mark.flow
ALL = ("decode_video", "encode_latents", "decode_latents", "encode_video", "compute_metrics")


def test_an_edit_runs_on_a_local_dask_cluster_and_shares_the_cache(make_spec) -> None:
    from prefect_dask import DaskTaskRunner

    settings = Settings(task_runner="dask", max_concurrency=2)
    assert isinstance(task_runner(settings), DaskTaskRunner)
    spec = make_spec()
    manifest = edit_video_with_settings(settings)(spec)
    assert {r.name: r.status for r in manifest.stages} == {name: "computed" for name in ALL}
    # The thread runner finds everything the Dask workers stored.
    again = edit_video_with_settings(Settings())(spec)
    assert {r.name: r.status for r in again.stages} == {name: "cached" for name in ALL}


def test_dask_without_prefect_dask_says_how_to_install_it(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_dask(name, *args, **kwargs):
        if name == "prefect_dask":
            raise ImportError("No module named 'prefect_dask'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    with pytest.raises(SpecError, match=r"pip install 'reelflow\[dask\]'"):
        task_runner(Settings(task_runner="dask"))
