"""compute_metrics: how far the edited frames are from the source, per frame and on average."""

from __future__ import annotations

from typing import Any

import numpy as np

from core.metrics import METRICS
from schemas.calls import StageCall
from schemas.refs import ArtifactRef
from tasks.runtime import StageContext, run_stage
from tasks.stage import stage_task


@stage_task("compute_metrics")
def compute_metrics(call: StageCall) -> ArtifactRef:
    """One ``(F,)`` array per metric, and their means in the attrs under ``metrics``."""
    return run_stage(call, _compute)


def _compute(ctx: StageContext) -> dict[str, Any]:
    source = ctx.array("source", "frames")
    edited = ctx.array("edited", "frames")
    means = {}
    for name in ctx.call.stage.params.metrics:
        values = METRICS[name](source, edited)
        ctx.writer.write_array(name, values.astype(np.float32), dims=("frame",), dtype=np.float32)
        means[name] = round(float(values.mean()), 6)
    return {"metrics": means}
