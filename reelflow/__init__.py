"""reelflow: declarative, cached, resumable diffusion video editing on Prefect and Zarr.

The project's folders install as one namespace: ``reelflow.schemas`` (pydantic specs),
``reelflow.core`` (numerics), ``reelflow.storage`` (the Zarr store), ``reelflow.tasks`` (one Prefect
task per stage), ``reelflow.flows`` (the DAG engine, flows and CLI) and ``reelflow.deployments``
(presets and prefect.yaml). Method authors import from :mod:`reelflow.methods`; users run edits
with :mod:`reelflow.api`.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("reelflow")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
