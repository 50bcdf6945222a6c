"""How long a run has left: the running stage at the rate its trainer measured, the stages
after it at the same rate in training samples (their planned steps times their batch).

An estimate, and said to be one: a later stage whose samples cost more than the running
stage's (fusion's teacher forward, say) takes longer than it predicts, and stages that train
nothing (score, prune, eval) count as no time.
"""

from __future__ import annotations

from amber.plan import StageRun
from amber.records import ProgressRecord
from amber.stages import TrainingParams


def planned_samples(run: StageRun) -> int | None:
    """Training samples a stage reads in all (None: it trains nothing)."""
    stage = run.stage
    if not isinstance(stage, TrainingParams):
        return None
    batch = stage.micro_batch_size * stage.gradient_accumulation * run.resources.processes
    return stage.planned_steps() * batch


def remaining(
    record: ProgressRecord, later: list[StageRun], now: float
) -> tuple[float | None, float | None]:
    """Seconds left in the running stage and in the whole run, at `now` (epoch seconds)."""
    stage = record.remaining_seconds(now)
    if stage is None or not record.samples_per_second:
        return stage, None
    samples = sum(n for n in map(planned_samples, later) if n)
    return stage, stage + samples / record.samples_per_second


def human(seconds: float) -> str:
    """`kubectl get`'s ETA column: 42s, 5m10s, 3h07m, 2d04h."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
