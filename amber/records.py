"""What a stage's trainer tells its driver (`amber run` or the operator), typed once here and
imported at both ends:

- event lines on stdout (`Event`; a line that starts with `{"event"`), which `amber run`
  draws its progress bars from;
- the stage's result (`StageResult`), the last event and, on Kubernetes, the container's
  termination message, which the operator reads into the stage's status;
- `{stage}/progress.json` in storage (`ProgressRecord`), which the operator turns into the
  status's progress, rates and estimated time remaining.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError

from amber.base import Model

EVENT_PREFIX = '{"event"'
# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_BYTES = 4000


class Event(Model):
    """One event line. Kinds: started, progress, resumed, resharded, warning, reused, result,
    and a stage's own notes; a kind adds its fields (progress: step, total, rates, loss)."""

    model_config = ConfigDict(extra="allow")

    event: str
    stage: str = ""

    def line(self) -> str:
        # json.dumps's spacing: people grep stage logs for '"event": "resumed"'.
        return json.dumps(self.model_dump(mode="json", exclude_none=True), default=str)

    def get(self, key: str, default: Any = None) -> Any:
        """A field the kind adds (extra fields are kept as they were sent)."""
        return (self.model_extra or {}).get(key, default)


def parse_event(line: str) -> Event | None:
    """The event on a stdout line, or None for any other line (logs, warnings)."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        return Event.model_validate_json(line)
    except ValidationError:
        return None


class StageResult(Model):
    """How one attempt of a stage ended, as its rank 0 reports it."""

    stage: str
    status: Literal["Succeeded", "Failed"]
    output: str | None = Field(None, description="output: the committed output's URI.")
    step: int | None = Field(None, description="step: the step the output was made at.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="metrics: its summary.")
    message: str | None = Field(None, description="message: why it failed.")
    code: int | None = Field(
        None,
        description="code: the failure's class as an `amber` exit status (2 input, 3 storage: "
        "amber/errors.py); None for the stage's own failures.",
    )
    reused: bool = Field(False, description="reused: the output was committed before.")

    def event(self) -> Event:
        return Event(event="result", **self.model_dump(mode="json", exclude_none=True))

    def termination_message(self) -> str:
        """The JSON the operator reads, within Kubernetes' size limit: metrics are left out
        first, then the message shortened, so that what is kept still parses."""
        text = self.model_dump_json(exclude_none=True)
        if len(text.encode()) > TERMINATION_MESSAGE_BYTES:
            text = self.model_copy(update={"metrics": {}}).model_dump_json(exclude_none=True)
        if len(text.encode()) > TERMINATION_MESSAGE_BYTES:
            short = (self.message or "")[: TERMINATION_MESSAGE_BYTES // 2]
            text = self.model_copy(update={"metrics": {}, "message": short}).model_dump_json(
                exclude_none=True
            )
        return text

    @classmethod
    def parse(cls, text: str) -> StageResult | None:
        """A termination message or result event line, or None when it is not one (a
        container that died before reporting leaves its log's tail there)."""
        try:  # pydantic's ValidationError is a ValueError, as is a JSON decoding error
            return cls.model_validate({k: v for k, v in json.loads(text).items() if k != "event"})
        except (ValueError, AttributeError):
            return None


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
    spec_hash: str = Field("", description="specHash: the stage spec it is the progress of.")

    def remaining_seconds(self, now: float) -> float | None:
        """Seconds this stage has left at `now` (epoch seconds), at its measured rate."""
        if not self.steps_per_second:
            return None
        left = (self.total - self.step) / self.steps_per_second
        return max(0.0, left - max(0.0, now - self.time))
