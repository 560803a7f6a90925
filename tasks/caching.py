"""Prefect caching keyed by the stage key, honoured only while the artifact is complete.

The DAG engine computes every stage key before it submits anything and sets ``refresh_cache`` on
stages whose artifact is not complete, so a stale record (its artifact garbage-collected or
deleted) is overwritten instead of returned. For a stage whose artifact is complete the key is
returned as is and Prefect serves the recorded ArtifactRef without running the body.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from reelflow.schemas.calls import StageCall
from reelflow.schemas.errors import LeaseHeld, ReelflowError, StoreError
from reelflow.tasks.runtime import open_store


@dataclass
class StageKeyPolicy(CachePolicy):
    """Cache key = ``{stage}-{stage key}-{store hash}``; None (no caching) when the artifact is incomplete and no refresh was asked."""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        call = inputs.get("call")
        if not isinstance(call, StageCall):
            return None
        complete = open_store(call.store).is_complete(call.stage_type, call.key)
        if complete or task_ctx.task.refresh_cache:
            # Records of stores that share Prefect's default result storage must not mix.
            store = hashlib.sha256(call.store.url.encode()).hexdigest()[:12]
            return f"{call.stage_type}-{call.key}-{store}"
        return None


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O trouble (network, store, a lease another run holds); never deterministic errors."""
    try:
        state.result()
    except (StoreError, LeaseHeld):
        return True
    except ReelflowError:
        return False
    except (OSError, TimeoutError, ConnectionError):
        return True
    except BaseException:
        return False
    return False
