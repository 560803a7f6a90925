"""One thin Prefect task per declared stage, registered by ``@stage_task`` in each method's
implementation modules; :func:`load_implementations` (run when the DAG engine is imported) loads them
all and checks that declarations and implementations match. The same modules register their stages'
preflight checks with ``@stage_check`` (see tasks.preflight), so loading them registers those too."""

from reelflow.tasks.preflight import CHECKS
from reelflow.tasks.stage import TASKS, load_implementations, task_for

__all__ = ["CHECKS", "TASKS", "load_implementations", "task_for"]
