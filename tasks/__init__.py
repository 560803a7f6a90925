"""One thin Prefect task per stage; importing this package registers them all in ``TASKS``."""

from tasks import fatezero, metrics, vae, video  # noqa: F401  (registration side effect)
from tasks.stage import TASKS

__all__ = ["TASKS"]
