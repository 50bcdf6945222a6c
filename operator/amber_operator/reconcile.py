"""The operator's one decision: (resource, status, observed children, now) -> what to do.

Pure: no API calls, no storage access, no clock. The handlers gather the inputs, call
`decide`, apply its actions idempotently, write the status once and then post the events.
Most operator tests exercise this function directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from amber import eta
from amber.api import AmberCompression, AmberCompressionStatus, StageStatus
from amber.plan import FINAL, REPORT, StageRun, plan
from amber.records import ProgressRecord, StageResult
from amber_operator import conditions as c

JOB_NAME_MAX = 52  # leaves room for the pod suffix Kubernetes appends to Job pod names


@dataclass(frozen=True)
class ObservedJob:
    """A stage Job as the handler saw it."""

    name: str
    stage: str
    spec_hash: str
    attempt: int
    finished: str | None = None  # "Complete" | "Failed" | None (still going)
    finished_at: datetime | None = None
    disrupted: bool = False  # failed because a pod was preempted or its node lost
    suspended: bool = False  # held by its queue: not admitted yet, or preempted (Kueue)
    message: str = ""  # failure message, or the trainer's termination message on success
    result: StageResult | None = None  # the trainer's termination message (pod 0)


@dataclass(frozen=True)
class Observed:
    jobs: tuple[ObservedJob, ...] = ()
    committed: dict[str, str] = field(default_factory=dict)  # stage -> output's spec hash
    stage: str | None = None  # the stage `progress` and `checkpoint` were read for
    progress: ProgressRecord | None = None  # that stage's progress.json
    checkpoint: int | None = None  # that stage's newest committed checkpoint step
    final_committed: bool = False
    storage_error: str | None = None
    held_by: str | None = None  # another holder of the run folder's lease (an `amber run`)


@dataclass(frozen=True)
class CreateAttempt:
    """ConfigMap + headless Service + Indexed Job (+ PodGroup) for one stage attempt."""

    run: StageRun
    attempt: int
    job: str


@dataclass(frozen=True)
class DeleteJob:
    name: str
    why: str


@dataclass(frozen=True)
class PublishFinal:
    # What the report page says of each stage's attempts: the operator keeps them in the
    # status (amber run, in the run folder's history).
    stages: tuple[StageStatus, ...] = ()


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


# How often a running stage's progress (`kubectl get`'s column) is read again; the Job's own
# end is a watch event, not a poll.
PROGRESS_REFRESH_SECONDS = 15.0


@dataclass
class Decision:
    status: AmberCompressionStatus
    actions: list = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None


def job_name(resource: str, stage: str, spec_hash: str, attempt: int) -> str:
    """Deterministic, so a restarted operator finds (never duplicates) what it created."""
    suffix = f"-{spec_hash[:5]}-{attempt}"
    head = f"{resource[:24]}-{stage[:16]}".rstrip("-")
    return (head[: JOB_NAME_MAX - len(suffix)].rstrip("-") + suffix).lower()


def backoff(restarts: int, base: int, cap: int) -> float:
    """Seconds before the next attempt after `restarts` counted failures: doubling, capped."""
    if restarts <= 0:
        return 0.0
    return float(min(cap, base * 2 ** (restarts - 1)))


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def decide(
    obj: AmberCompression,
    status: AmberCompressionStatus,
    observed: Observed,
    now: datetime,
    generation: int | None = None,
    *,
    runs: list[StageRun] | None = None,
) -> Decision:
    """`runs`: the resource's plan, when the caller has made it already."""
    spec = obj.spec
    runs = plan(obj) if runs is None else runs
    stamp = _iso(now)
    previous = {s.name: s for s in status.stages}
    stages: list[StageStatus] = []
    for run in runs:
        old = previous.get(run.stage.name)
        if old is not None and old.spec_hash == run.spec_hash:
            stages.append(old.model_copy(deep=True))
        else:  # new stage, or its spec changed: it starts over
            stages.append(
                StageStatus(name=run.stage.name, type=run.stage.type, spec_hash=run.spec_hash)
            )
    decision = Decision(status=AmberCompressionStatus(stages=stages, restarts=status.restarts))
    out = decision.status
    out.conditions = list(status.conditions)
    out.observed_generation = generation
    out.final_uri = status.final_uri
    out.report_uri = status.report_uri

    def condition(type_, value, reason, message=""):
        out.conditions = c.set_condition(
            out.conditions, type_, value, reason, message, stamp, generation
        )

    def event(kind, reason, message):
        decision.events.append(Event(kind, reason, message))

    def succeed(run: StageRun, stage: StageStatus, job: ObservedJob | None) -> None:
        result = (job.result if job else None) or StageResult(
            stage=run.stage.name, status="Succeeded"
        )
        stage.phase = "Succeeded"
        stage.completion_time = _iso(job.finished_at) if job and job.finished_at else stamp
        stage.output_uri = result.output or f"{run.run_uri}/{run.stage.name}/output"
        stage.metrics = _scalars(result.metrics)
        stage.progress = stage.samples_per_second = stage.estimated_remaining_seconds = None
        stage.retry_after = None
        stage.message = f"completed by {job.name}" if job else "output committed"
        event("Normal", c.STAGE_SUCCEEDED, f"stage {run.stage.name} succeeded")

    # 1. Storage is the source of truth for finished stages: a committed output of the
    #    current spec means the stage is done, whoever ran it.
    for run, stage in zip(runs, stages, strict=True):
        if observed.committed.get(run.stage.name) == run.spec_hash and stage.phase != "Succeeded":
            latest = _latest_job(observed.jobs, run, stage)
            succeed(run, stage, latest if latest and latest.finished == "Complete" else None)

    # 2. Jobs that no longer belong to the current plan are stopped (a changed spec).
    current_jobs = {(r.stage.name, r.spec_hash) for r in runs}
    for job in observed.jobs:
        if job.finished is None and (job.stage, job.spec_hash) not in current_jobs:
            decision.actions.append(DeleteJob(job.name, "its stage spec changed"))
            event("Normal", c.JOB_DELETED, f"deleted {job.name}: its stage spec changed")

    # 3. The first stage not done is the one to run.
    current: tuple[StageRun, StageStatus] | None = next(
        ((r, s) for r, s in zip(runs, stages, strict=True) if s.phase != "Succeeded"), None
    )

    done = sum(s.phase == "Succeeded" for s in stages)
    out.progress = f"{done}/{len(stages)}"

    if observed.storage_error:
        # Transient as far as anyone knows, and retried: not Failed (which is terminal), but
        # whatever runs goes on running, Stalled=True saying why nothing new starts.
        already = any(
            x.type == c.STALLED and x.status == "True" and x.reason == c.STORAGE_UNAVAILABLE
            for x in status.conditions
        )
        condition(c.STALLED, True, c.STORAGE_UNAVAILABLE, observed.storage_error)
        condition(c.READY, False, c.STORAGE_UNAVAILABLE, observed.storage_error)
        if not already:
            event("Warning", c.STORAGE_UNAVAILABLE, observed.storage_error)
        live = {(r.stage.name, r.spec_hash) for r in runs}
        running = any(j.finished is None and (j.stage, j.spec_hash) in live for j in observed.jobs)
        out.phase = "Running" if running else "Pending"
        out.current_stage = current[0].stage.name if current else None
        decision.requeue_after = 30.0
        return decision

    if observed.held_by and current is not None:
        why = f"the run's folder is held by {observed.held_by}"
        condition(c.STALLED, True, c.FOLDER_HELD, why)
        condition(c.READY, False, c.FOLDER_HELD, why)
        if not any(x.type == c.STALLED and x.reason == c.FOLDER_HELD for x in status.conditions):
            event("Warning", c.FOLDER_HELD, why)
        out.phase = "Pending"
        out.current_stage = current[0].stage.name
        decision.requeue_after = 30.0
        return decision

    # 4. Everything done: publish the final model once, then report Ready.
    if current is None:
        out.current_stage = None
        out.final_uri = f"{runs[0].run_uri}/{FINAL}"
        out.report_uri = f"{runs[0].run_uri}/{REPORT}"
        if not observed.final_committed:
            decision.actions.append(PublishFinal(tuple(out.stages)))
            message = f"final model published to {out.final_uri}; report {out.report_uri}"
            event("Normal", c.FINAL_PUBLISHED, message)
        out.phase = "Succeeded"
        condition(c.READY, True, c.SUCCEEDED, "all stages succeeded")
        condition(c.RECONCILING, False, c.SUCCEEDED, "")
        condition(c.STALLED, False, c.HEALTHY, "")
        condition(c.SUSPENDED, False, c.NOT_SUSPENDED, "")
        return decision

    run, stage = current
    out.current_stage = run.stage.name
    mine = observed.stage == run.stage.name
    progress = observed.progress if mine else None
    checkpoint = observed.checkpoint if mine else None
    latest = _latest_job(observed.jobs, run, stage)
    if latest is not None and latest.finished == "Complete":
        # Storage decides (step 1): a Job that exited 0 without committing its output failed.
        why = f"{latest.name} completed but {run.stage.name} has no committed output"
        latest = replace(latest, finished="Failed", disrupted=False, message=why)
    running = latest is not None and latest.finished is None
    if latest is not None:
        # A Job created just before a restart, whose status write was lost, still counts.
        stage.attempts = max(stage.attempts, latest.attempt)
        if latest.attempt == stage.attempts:
            stage.job = latest.name

    # 5. Suspended: stop the running attempt, keep every checkpoint.
    if spec.suspend:
        if running:
            decision.actions.append(DeleteJob(latest.name, "suspended"))
            event("Normal", c.SUSPEND_REQUESTED, f"suspended: deleted {latest.name}")
        stage.phase = "Suspended"
        stage.message = "suspended; checkpoints kept"
        out.phase = "Suspended"
        condition(c.SUSPENDED, True, c.SUSPEND_REQUESTED, "spec.suspend is true")
        condition(c.RECONCILING, False, c.SUSPEND_REQUESTED, "")
        condition(c.READY, False, c.SUSPEND_REQUESTED, "suspended")
        condition(c.STALLED, False, c.HEALTHY, "")
        return decision
    condition(c.SUSPENDED, False, c.NOT_SUSPENDED, "")

    # 6. An attempt is held by its queue (Kueue admits a gang whole by unsuspending its Job,
    #    and preempts it by suspending it again): queued, and a preemption is a disruption,
    #    never counted; the same Job resumes from the last checkpoint once admitted again.
    #    A Job can be held without `gang: kueue` too (a Kueue that manages every Job of the
    #    namespace): only one seen running before was preempted.
    queue = f"queue {spec.scheduling.queue_name}" if spec.scheduling.queue_name else "its queue"
    if running and latest.suspended:
        if stage.admitted:
            stage.disruptions += 1
            resumes = f" from checkpoint {checkpoint}" if checkpoint is not None else ""
            event(
                "Warning",
                c.STAGE_DISRUPTED,
                f"stage {run.stage.name} attempt {latest.attempt} preempted by {queue}; "
                f"{latest.name} resumes{resumes} when admitted again",
            )
        why = f"stage {run.stage.name}: {latest.name} waits for admission by {queue}"
        stage.phase = "Queued"
        stage.admitted = False
        stage.message = why
        out.phase = "Queued"
        condition(c.RECONCILING, True, c.AWAITING_ADMISSION, why)
        condition(c.READY, False, c.AWAITING_ADMISSION, why)
        condition(c.STALLED, False, c.HEALTHY, "")
        decision.requeue_after = PROGRESS_REFRESH_SECONDS
        return decision
    if running and stage.phase == "Queued":
        stage.message = f"attempt {latest.attempt} admitted by {queue}"
        event("Normal", c.STAGE_ADMITTED, f"stage {run.stage.name}: {stage.message}")

    # 7. An attempt is running: report its progress.
    if running:
        stage.phase = "Running"
        stage.admitted = True
        if progress:
            stage.progress = f"{progress.step}/{progress.total}"
            out.progress = f"{done}/{len(stages)} {run.stage.name} {stage.progress}"
            rate = progress.samples_per_second
            stage.samples_per_second = round(rate, 3) if rate else None
            epoch = now.replace(tzinfo=timezone.utc).timestamp()
            left, whole = eta.remaining(progress, runs[runs.index(run) + 1 :], epoch)
            stage.estimated_remaining_seconds = None if left is None else round(left)
            if whole is not None:
                out.estimated_remaining_seconds = round(whole)
                out.eta = eta.human(whole)
        if checkpoint is not None:
            stage.last_checkpoint = checkpoint
        out.phase = "Running"
        condition(c.RECONCILING, True, c.STAGE_RUNNING, f"stage {run.stage.name} running")
        condition(c.READY, False, c.STAGE_RUNNING, f"stage {run.stage.name} running")
        condition(c.STALLED, False, c.HEALTHY, "")
        decision.requeue_after = PROGRESS_REFRESH_SECONDS
        return decision

    # 8. The last attempt failed: count it (unless a disruption), give up or back off.
    failed = latest is not None and latest.finished == "Failed"
    if failed and latest.attempt == stage.attempts:  # not an attempt a suspend deleted
        counted = not latest.disrupted or spec.failure_policy.count_disruptions
        if stage.last_failure < latest.attempt:
            stage.last_failure = latest.attempt
            if counted:
                stage.restarts += 1
                out.restarts += 1
            else:
                stage.disruptions += 1
            stage.message = f"failed: {latest.name}"
            kind = "disrupted" if latest.disrupted else "failed"
            event(
                "Warning",
                c.STAGE_DISRUPTED if latest.disrupted else c.STAGE_FAILED,
                f"stage {run.stage.name} attempt {latest.attempt} {kind}: {latest.message}"[:1000],
            )
        if stage.restarts > spec.failure_policy.max_restarts:
            stage.phase = "Failed"
            out.phase = "Failed"
            why = (
                f"stage {run.stage.name} failed {stage.restarts} times "
                f"(maxRestarts {spec.failure_policy.max_restarts}): {latest.message}"
            )[:1000]
            condition(c.STALLED, True, c.RESTARTS_EXHAUSTED, why)
            condition(c.READY, False, c.RESTARTS_EXHAUSTED, why)
            condition(c.RECONCILING, False, c.RESTARTS_EXHAUSTED, "")
            return decision
        policy = spec.failure_policy
        delay = (
            backoff(stage.restarts, policy.backoff_seconds, policy.max_backoff_seconds)
            if counted
            else 0.0
        )
        ready_at = (latest.finished_at or now) + timedelta(seconds=delay)
        if now < ready_at:
            stage.phase = "Pending"
            stage.retry_after = _iso(ready_at)
            out.phase = "Pending"
            condition(
                c.RECONCILING, True, c.BACKOFF, f"retrying {run.stage.name} at {stage.retry_after}"
            )
            condition(c.READY, False, c.BACKOFF, "")
            condition(c.STALLED, False, c.HEALTHY, "")
            decision.requeue_after = (ready_at - now).total_seconds()
            return decision

    # 9. Start the next attempt (the first, a retry, or after a resume). When the current
    #    attempt's Job is missing because its create failed, create that same Job again.
    missing = latest is None or latest.attempt < stage.attempts
    again = missing and stage.attempts > 0 and stage.phase != "Suspended"
    attempt = stage.attempts if again else stage.attempts + 1
    name = job_name(obj.metadata.name, run.stage.name, run.spec_hash, attempt)
    decision.actions.append(CreateAttempt(run, attempt, name))
    stage.attempts = attempt
    stage.job = name
    stage.admitted = False
    stage.start_time = stage.start_time or stamp
    stage.retry_after = None
    resumed = f" from checkpoint {checkpoint}" if checkpoint else ""
    queued = spec.scheduling.gang == "kueue"  # created suspended: Kueue admits the gang whole
    waits = f", waiting for admission by {queue}" if queued else ""
    stage.message = f"attempt {attempt} started{resumed}{waits}"
    stage.phase = out.phase = "Queued" if queued else "Running"
    event(
        "Normal",
        c.STAGE_STARTED if attempt == 1 or again else c.STAGE_RESTARTED,
        f"stage {run.stage.name} attempt {attempt}: Job {name}{resumed}{waits}",
    )
    reason = c.AWAITING_ADMISSION if queued else c.STAGE_STARTING
    condition(c.RECONCILING, True, reason, f"stage {run.stage.name}: {stage.message}")
    condition(c.READY, False, reason, "")
    condition(c.STALLED, False, c.HEALTHY, "")
    return decision


def _latest_job(jobs, run: StageRun, stage: StageStatus) -> ObservedJob | None:
    """The Job that speaks for this stage under its current spec: one still running if there
    is any (never start another beside it), else the newest attempt's."""
    mine = [j for j in jobs if j.stage == run.stage.name and j.spec_hash == run.spec_hash]
    live = [j for j in mine if j.finished is None]
    return max(live or mine, key=lambda j: j.attempt, default=None)


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
