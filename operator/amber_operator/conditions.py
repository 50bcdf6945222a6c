"""Condition types, reasons and the one helper that sets a condition the Kubernetes way.

Flux's kstatus and Argo CD read `Ready`, `Reconciling`, `Stalled`; `Suspended` is ours.
`lastTransitionTime` moves only when a condition's status flips.
"""

from __future__ import annotations

from amber.api import Condition

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
SUSPENDED = "Suspended"

# Reasons (CamelCase, as Kubernetes wants them)
SUCCEEDED = "Succeeded"
STAGE_RUNNING = "StageRunning"
STAGE_STARTING = "StageStarting"
BACKOFF = "Backoff"
SUSPEND_REQUESTED = "SuspendRequested"
NOT_SUSPENDED = "NotSuspended"
RESTARTS_EXHAUSTED = "RestartsExhausted"
INVALID_SPEC = "InvalidSpec"
STORAGE_UNAVAILABLE = "StorageUnavailable"
FOLDER_HELD = "RunFolderHeld"  # another holder (an `amber run`) has the run's lease
AWAITING_ADMISSION = "AwaitingAdmission"  # the stage's Job waits for its queue (Kueue)
HEALTHY = "Healthy"

# Event reasons
STAGE_STARTED = "StageStarted"
STAGE_SUCCEEDED = "StageSucceeded"
STAGE_FAILED = "StageFailed"
STAGE_DISRUPTED = "StageDisrupted"
STAGE_RESTARTED = "StageRestarted"
STAGE_ADMITTED = "StageAdmitted"
JOB_DELETED = "JobDeleted"
FINAL_PUBLISHED = "FinalPublished"


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> list[Condition]:
    """`conditions` with `type_` set; the transition time changes only on a status flip."""
    value = "True" if status else "False"
    previous = next((c for c in conditions if c.type == type_), None)
    moved = previous is None or previous.status != value
    updated = Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=now if moved else previous.last_transition_time,
        observed_generation=generation,
    )
    return [*(c for c in conditions if c.type != type_), updated]
