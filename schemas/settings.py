"""Environment facts: where the store lives, which device and dtype to run on.

These describe the machine, not the edit, so they live apart from the pipeline spec and are read
from ``REELFLOW_*`` environment variables (``REELFLOW_STORE``, ``REELFLOW_DEVICE``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_store() -> str:
    return str(Path.home() / ".cache" / "reelflow" / "store")


class Settings(BaseSettings):
    """Per-machine configuration; every field can be set as ``REELFLOW_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="REELFLOW_", frozen=True, extra="forbid")

    store: str = Field(
        default_factory=_default_store,
        description="Root URL of the artifact store (a local path, file://, memory:// or s3://).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for the store (JSON in the environment), e.g. an S3 endpoint.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        default="auto", description="Torch device for model stages; 'auto' picks cuda when available."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto",
        description="Default model dtype; 'auto' is float16 on cuda and float32 elsewhere. A model's own dtype wins.",
    )
    model_cache_dir: str | None = Field(
        default=None, description="Where from_pretrained caches hub downloads (None: the Hugging Face default)."
    )
    max_concurrency: int = Field(
        default=2, ge=1, le=64, description="How many independent stages of one edit (or of a comparison's edits) run at once."
    )
    lease_seconds: float = Field(
        default=900.0,
        gt=0,
        description="How long a stage's lease on its artifact lasts without renewal before another run may take it over.",
    )
    gpu_limit: str | None = Field(
        default=None,
        description=(
            "Name of a Prefect global concurrency limit held around every model stage, e.g. 'gpu' "
            "(create it with `prefect gcl create gpu --limit 1`); None runs model stages unthrottled."
        ),
    )
    task_runner: Literal["threads", "dask"] = Field(
        default="threads",
        description="How an edit's stages run: a thread pool in the flow-run process, or Dask (needs prefect-dask).",
    )
    dask_address: str | None = Field(
        default=None,
        description="Dask scheduler address (tcp://host:8786) for task_runner=dask; None starts a local cluster per edit.",
    )
    pictures_url: str | None = Field(
        default=None,
        description=(
            "Base URL under which the store's pictures/ directory is served (see `reelflow serve-pictures`); "
            "None presigns URLs on object stores and embeds pictures as data URLs elsewhere."
        ),
    )
    picture_url_seconds: int = Field(
        default=7 * 86400, gt=0, le=7 * 86400, description="Lifetime of presigned picture URLs on object stores."
    )
    reports: bool = Field(
        default=True, description="Write each edit's HTML report beside its manifest (false skips reading frames back for it)."
    )
