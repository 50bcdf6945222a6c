"""What a running stage writes for others to read: `{stage}/progress.json`, the record the
operator turns into the status's progress, rates and estimated time remaining."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from amber.base import Model


class ProgressRecord(Model):
    # A stage adds what it tracks (loss, phase); those fields are kept as they are.
    model_config = ConfigDict(extra="allow")

    step: int = Field(..., description="step: optimiser steps done, of this stage.")
    total: int = Field(..., description="total: the stage's steps.")
    time: float = Field(..., description="time: when written, seconds since the epoch.")
    steps_per_second: float | None = Field(
        None, description="stepsPerSecond: since this attempt's first step (None at first)."
    )
    samples_per_second: float | None = Field(
        None, description="samplesPerSecond: the same in training samples, all processes."
    )

    def remaining_seconds(self, now: float) -> float | None:
        """Seconds this stage has left at `now` (epoch seconds), at its measured rate."""
        if not self.steps_per_second:
            return None
        left = (self.total - self.step) / self.steps_per_second
        return max(0.0, left - max(0.0, now - self.time))
