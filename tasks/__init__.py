"""One thin Prefect task per stage; importing this package registers them all in ``TASKS``."""

from reelflow.tasks import fatezero, metrics, vae, video  # noqa: F401  (registration side effect)
from reelflow.tasks.stage import TASKS

__all__ = ["TASKS"]
