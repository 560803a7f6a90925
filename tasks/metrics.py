"""compute_metrics: how far the edited frames are from the source, per frame and on average."""

from __future__ import annotations


import numpy as np

from reelflow.core.metrics import METRICS
from reelflow.schemas.calls import StageCall
from reelflow.schemas.kinds import Metrics
from reelflow.schemas.refs import ArtifactRef
from reelflow.tasks.artifacts import contact_sheet, markdown_table, publish_markdown
from reelflow.tasks.runtime import StageContext, run_stage
from reelflow.tasks.stage import stage_task

SHEET_FRAMES = 8


@stage_task("compute_metrics")
def compute_metrics(call: StageCall) -> ArtifactRef:
    """One ``(F,)`` array per metric, and their means in the attrs under ``metrics``."""
    return run_stage(call, _compute)


def _compute(ctx: StageContext) -> Metrics:
    source = ctx.array("source", "frames")
    edited = ctx.array("edited", "frames")
    means, per_frame = {}, {}
    for name in ctx.call.stage.params.metrics:
        values = METRICS[name](source, edited)
        ctx.writer.write_array(name, values.astype(np.float32), dims=("frame",), dtype=np.float32)
        means[name], per_frame[name] = round(float(values.mean()), 6), values
    _publish(ctx, source, edited, means, per_frame)
    return Metrics(metrics=means)


def _publish(
    ctx: StageContext, source: np.ndarray, edited: np.ndarray, means: dict[str, float], per_frame: dict[str, np.ndarray]
) -> None:
    """The contact sheet (source frames above, edited frames below) and the metrics per frame."""
    shown = np.unique(np.linspace(0, len(source) - 1, min(SHEET_FRAMES, len(source))).round().astype(int))
    sheet = ctx.picture("contact-sheet", contact_sheet(source[shown], rows=[edited[shown]]))
    rows = [(f"frame {i}", *(f"{per_frame[m][i]:.3f}" for m in means)) for i in shown]
    lines = [
        f"### `{ctx.call.stage_id}`: source (top) and edited (bottom), frames {', '.join(map(str, shown))}",
        "",
        sheet,
        "",
        markdown_table(("", *means), [("mean", *(f"{v:.3f}" for v in means.values())), *rows]),
    ]
    publish_markdown(f"{ctx.call.stage_id}-{ctx.call.key[:8]}", "\n".join(lines), description="contact sheet and metrics")
