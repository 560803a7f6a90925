"""References to artifacts in the store: the only thing a task returns or Prefect persists."""

from __future__ import annotations

from pydantic import Field

from reelflow.schemas.base import Model


class ArraySpec(Model):
    """Shape, dtype and dimension names of one array inside an artifact."""

    shape: tuple[int, ...] = Field(description="Array shape.")
    dtype: str = Field(description="Stored dtype, e.g. 'float16' or 'uint8'.")
    dims: tuple[str, ...] = Field(description="Dimension names, one per axis (Zarr dimension_names).")


class ArtifactRef(Model):
    """Where one stage's output lives and what it holds.

    A few hundred bytes of JSON: tensors never cross a task boundary, this does.
    """

    store: str = Field(description="Root URL of the store the artifact lives in.")
    path: str = Field(description="Path of the artifact's Zarr group relative to the store root.")
    stage: str = Field(description="Stage type that produced it, e.g. 'encode_latents'.")
    key: str = Field(description="Content-addressed stage key (sha256 hex).")
    arrays: dict[str, ArraySpec] = Field(default_factory=dict, description="Arrays in the group by name.")
    run_id: str = Field(default="", description="Id of the run (flow run) that computed the artifact.")
    task_run_id: str = Field(default="", description="Id of the Prefect task run that computed it, if any.")

    @property
    def url(self) -> str:
        return f"{self.store.rstrip('/')}/{self.path}"
