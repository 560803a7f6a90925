"""reelflow from Python: run a preset or spec on a clip, load a spec, open an artifact.

    from reelflow.api import run, load_spec, open_artifact, open_dataset

    manifest = run("fatezero-style", input="clip.mp4",
                   overrides=["stages.denoise_latents.params.target_prompt=..."])
    manifest = run("my-edit.yaml", input="clip.mp4", sources={"edited_frame": "frame0.png"})
    manifest.outputs                         # output video(s) and the run manifest
    group = open_artifact(manifest.stages[2].artifact)         # a read-only zarr.Group
    dataset = open_dataset(manifest.stages[2].artifact)        # the same as an xarray.Dataset

``run`` is the ``edit-video`` Prefect flow: with no Prefect server configured it starts a local one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from reelflow.flows.sources import source_overrides
from reelflow.schemas.loading import load_spec as _load
from reelflow.schemas.manifest import RunManifest
from reelflow.schemas.pipeline import VIDEO, PipelineSpec
from reelflow.schemas.settings import Settings
from reelflow.storage.store import ArtifactStore, locate_artifact_url


def load_spec(spec: str | Mapping[str, Any], overrides: Sequence[str] = ()) -> PipelineSpec:
    """A preset name, a YAML file path or a mapping, with ``key.path=value`` overrides, validated."""
    from reelflow.deployments import spec_path

    return _load(spec_path(spec) if isinstance(spec, str) else spec, overrides)


def run(
    spec: str | Mapping[str, Any] | PipelineSpec,
    *,
    input: str | None = None,
    sources: Mapping[str, str] | None = None,
    store: str | None = None,
    output: str | None = None,
    overrides: Sequence[str] = (),
) -> RunManifest:
    """Run a pipeline on a clip; ``sources`` maps source names to files (``{"reference": "ref.png"}``)."""
    from reelflow.flows.commands import run_spec

    given = [*overrides, *(f"{name}={json.dumps(value)}" for name, value in (("store", store), ("output", output)) if value)]
    pipeline = load_spec(spec.model_dump(mode="json") if isinstance(spec, PipelineSpec) else spec, given)
    files = source_overrides(pipeline, {VIDEO: input, **(sources or {})})
    return run_spec(load_spec(pipeline.model_dump(mode="json"), files) if files else pipeline)


def open_artifact(url_or_key: str, store: str | None = None) -> Any:
    """An artifact's Zarr group, read-only: by URL, or by key (a unique prefix of 6+ hex digits) in ``store``."""
    return _open(url_or_key, store)[0]


def open_dataset(url_or_key: str, store: str | None = None, group: str | None = None) -> Any:
    """An artifact as an ``xarray.Dataset`` (``group``: a subgroup such as FateZero's ``attention``)."""
    import xarray

    _, artifact_store, rel = _open(url_or_key, store)
    return xarray.open_zarr(artifact_store.url_of(rel), group=group, consolidated=False, storage_options=artifact_store.storage_options or None)


def _open(url_or_key: str, store: str | None) -> tuple[Any, ArtifactStore, str]:
    settings = Settings()
    if "/" in url_or_key:
        root, stage, key = locate_artifact_url(url_or_key)
        artifact_store = ArtifactStore(root, settings.storage_options)
        rel = ArtifactStore.artifact_path(stage, key)
    else:
        artifact_store = ArtifactStore(store or settings.store, settings.storage_options)
        rel = artifact_store.find(url_or_key).path
    return artifact_store.open_path(rel), artifact_store, rel
