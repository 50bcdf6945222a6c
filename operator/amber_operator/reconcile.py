"""The operator's one decision: (resource, status, observed children, now) -> what to do.

Pure: no API calls, no storage access, no clock. The handlers gather the inputs, call
`decide`, apply its actions idempotently, write the status once and then post the events.
Most operator tests exercise this function directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from amber import eta
from amber.api import AmberCompression, AmberCompressionStatus, StageStatus, timestamp
from amber.layout import FINAL, REPORT
from amber.plan import StageRun, plan
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


# What each way a pass can end says in the four conditions, (Ready, Reconciling, Stalled,
# Suspended); None leaves a condition as it was. Flux's kstatus reads the first three.
OUTCOMES = {
    "succeeded": (True, False, False, False),
    "suspended": (False, False, False, True),
    "progressing": (False, True, False, False),  # starting, queued, running, backing off
    "retrying": (False, None, True, None),  # storage unavailable, folder held: tried again
    "exhausted": (False, False, True, False),  # restarts used up: needs a person
    "invalid": (False, None, True, None),  # the spec: needs a person
}


@dataclass
class Pass:
    """One pass's inputs and what it has decided so far; the policies below read and add."""

    obj: AmberCompression | None  # None: a spec the types reject (`decide_invalid`)
    previous: AmberCompressionStatus
    observed: Observed
    now: datetime
    generation: int | None
    runs: list[StageRun]
    decision: Decision

    @property
    def out(self) -> AmberCompressionStatus:
        return self.decision.status

    @property
    def stamp(self) -> str:
        return timestamp(self.now)

    def event(self, kind: str, reason: str, message: str) -> None:
        self.decision.events.append(Event(kind, reason, message))

    def had(self, type_: str, reason: str) -> bool:
        """Whether the last pass ended with `type_` True for `reason` (its event was posted)."""
        return any(
            x.type == type_ and x.status == "True" and x.reason == reason
            for x in self.previous.conditions
        )

    def settle(
        self, outcome: str, reason: str, message: str = "", requeue: float | None = None
    ) -> Decision:
        """End the pass: the conditions `outcome` implies, with `reason` and `message`."""
        ready, reconciling, stalled, suspended = OUTCOMES[outcome]
        values = [
            (c.READY, ready, reason, message),
            (c.RECONCILING, reconciling, reason, message if reconciling else ""),
            (c.STALLED, stalled, reason if stalled else c.HEALTHY, message if stalled else ""),
            (
                c.SUSPENDED,
                suspended,
                c.SUSPEND_REQUESTED if suspended else c.NOT_SUSPENDED,
                message if suspended else "",
            ),
        ]
        for type_, value, why, text in values:
            if value is not None:
                self.out.conditions = c.set_condition(
                    self.out.conditions, type_, value, why, text, self.stamp, self.generation
                )
        self.decision.requeue_after = requeue
        return self.decision


@dataclass(frozen=True)
class Current:
    """The stage to run (the first not done), and what its Jobs and storage say of it."""

    run: StageRun
    stage: StageStatus
    latest: ObservedJob | None  # the Job that speaks for it (`_latest_job`)
    progress: ProgressRecord | None
    checkpoint: int | None

    @property
    def running(self) -> bool:
        return self.latest is not None and self.latest.finished is None


def decide(
    obj: AmberCompression,
    status: AmberCompressionStatus,
    observed: Observed,
    now: datetime,
    generation: int | None = None,
    *,
    runs: list[StageRun] | None = None,
) -> Decision:
    """The pass, as a list of policies in order; the first that ends the pass decides its
    outcome. `runs`: the resource's plan, when the caller has made it already."""
    runs = plan(obj) if runs is None else runs
    p = begin(obj, status, observed, now, generation, runs)
    mark_committed(p)
    stop_outdated_jobs(p)
    if observed.storage_error:
        return storage_unavailable(p)
    if observed.held_by and _first_not_done(p) is not None:
        return folder_held(p)
    current = current_stage(p)
    if current is None:
        return publish(p)
    record_lost_failures(p, current)
    return (
        suspend(p, current)
        or held_by_queue(p, current)
        or report_running(p, current)
        or count_failure(p, current)
        or start_attempt(p, current)
    )


def decide_invalid(
    status: AmberCompressionStatus, why: str, now: datetime, generation: int | None
) -> Decision:
    """A spec the types reject (one that slipped past admission, or a CRD older than the
    operator): Failed until the spec changes, nothing started or stopped."""
    out = status.model_copy(deep=True)
    out.phase = "Failed"
    p = Pass(None, status, Observed(), now, generation, [], Decision(status=out))
    p.event("Warning", c.INVALID_SPEC, why[:1000])
    return p.settle("invalid", c.INVALID_SPEC, why)


def begin(obj, status, observed, now, generation, runs) -> Pass:
    """The status carried over: each stage's as it was, unless its spec changed (then it
    starts over); the conditions and published URIs as they were."""
    previous = {s.name: s for s in status.stages}
    stages: list[StageStatus] = []
    for run in runs:
        old = previous.get(run.stage.name)
        if old is not None and old.spec_hash == run.spec_hash:
            stages.append(old.model_copy(deep=True))
        else:
            stages.append(
                StageStatus(name=run.stage.name, type=run.stage.type, spec_hash=run.spec_hash)
            )
    out = AmberCompressionStatus(stages=stages, restarts=status.restarts)
    out.conditions = list(status.conditions)
    out.observed_generation = generation
    out.final_uri = status.final_uri
    out.report_uri = status.report_uri
    return Pass(obj, status, observed, now, generation, runs, Decision(status=out))


def mark_committed(p: Pass) -> None:
    """Storage is the source of truth for finished stages: a committed output of the current
    spec means the stage is done, whoever ran it."""
    for run, stage in zip(p.runs, p.out.stages, strict=True):
        committed = p.observed.committed.get(run.stage.name) == run.spec_hash
        if committed and stage.phase != "Succeeded":
            latest = _latest_job(p.observed.jobs, run, stage)
            job = latest if latest is not None and latest.finished == "Complete" else None
            result = (job.result if job else None) or StageResult(
                stage=run.stage.name, status="Succeeded"
            )
            stage.phase = "Succeeded"
            stage.completion_time = (
                timestamp(job.finished_at) if job and job.finished_at else p.stamp
            )
            stage.output_uri = result.output or f"{run.run_uri}/{run.stage.name}/output"
            stage.metrics = _scalars(result.metrics)
            stage.progress = stage.samples_per_second = stage.estimated_remaining_seconds = None
            stage.retry_after = None
            stage.message = f"completed by {job.name}" if job else "output committed"
            p.event("Normal", c.STAGE_SUCCEEDED, f"stage {run.stage.name} succeeded")
    done = sum(s.phase == "Succeeded" for s in p.out.stages)
    p.out.progress = f"{done}/{len(p.out.stages)}"


def stop_outdated_jobs(p: Pass) -> None:
    """Jobs that no longer belong to the current plan (a changed spec) are stopped."""
    current = {(r.stage.name, r.spec_hash) for r in p.runs}
    for job in p.observed.jobs:
        if job.finished is None and (job.stage, job.spec_hash) not in current:
            p.decision.actions.append(DeleteJob(job.name, "its stage spec changed"))
            p.event("Normal", c.JOB_DELETED, f"deleted {job.name}: its stage spec changed")


def _first_not_done(p: Pass) -> tuple[StageRun, StageStatus] | None:
    pairs = zip(p.runs, p.out.stages, strict=True)
    return next(((r, s) for r, s in pairs if s.phase != "Succeeded"), None)


def storage_unavailable(p: Pass) -> Decision:
    """Transient as far as anyone knows, and retried: never Failed (which is terminal), but
    whatever runs goes on running, Stalled saying why nothing new starts."""
    why = p.observed.storage_error
    if not p.had(c.STALLED, c.STORAGE_UNAVAILABLE):
        p.event("Warning", c.STORAGE_UNAVAILABLE, why)
    live = {(r.stage.name, r.spec_hash) for r in p.runs}
    running = any(j.finished is None and (j.stage, j.spec_hash) in live for j in p.observed.jobs)
    p.out.phase = "Running" if running else "Pending"
    current = _first_not_done(p)
    p.out.current_stage = current[0].stage.name if current else None
    return p.settle("retrying", c.STORAGE_UNAVAILABLE, why, requeue=30.0)


def folder_held(p: Pass) -> Decision:
    """Someone else (an `amber run`) holds the run's folder: wait for it, start nothing."""
    why = f"the run's folder is held by {p.observed.held_by}"
    if not any(x.type == c.STALLED and x.reason == c.FOLDER_HELD for x in p.previous.conditions):
        p.event("Warning", c.FOLDER_HELD, why)
    p.out.phase = "Pending"
    p.out.current_stage = _first_not_done(p)[0].stage.name
    return p.settle("retrying", c.FOLDER_HELD, why, requeue=30.0)


def publish(p: Pass) -> Decision:
    """Everything done: publish the final model once, then report Ready."""
    out = p.out
    out.current_stage = None
    out.final_uri = f"{p.runs[0].run_uri}/{FINAL}"
    out.report_uri = f"{p.runs[0].run_uri}/{REPORT}"
    if not p.observed.final_committed:
        p.decision.actions.append(PublishFinal(tuple(out.stages)))
        message = f"final model published to {out.final_uri}; report {out.report_uri}"
        p.event("Normal", c.FINAL_PUBLISHED, message)
    out.phase = "Succeeded"
    return p.settle("succeeded", c.SUCCEEDED, "all stages succeeded")


def current_stage(p: Pass) -> Current | None:
    """The first stage not done, with the Job that speaks for it: a Job that exited 0 without
    committing its output failed (storage decides); one created just before a restart,
    whose status write was lost, still counts as the stage's latest attempt."""
    found = _first_not_done(p)
    if found is None:
        return None
    run, stage = found
    p.out.current_stage = run.stage.name
    mine = p.observed.stage == run.stage.name
    latest = _latest_job(p.observed.jobs, run, stage)
    if latest is not None and latest.finished == "Complete":
        why = f"{latest.name} completed but {run.stage.name} has no committed output"
        latest = replace(latest, finished="Failed", disrupted=False, message=why)
    if latest is not None:
        stage.attempts = max(stage.attempts, latest.attempt)
        if latest.attempt == stage.attempts:
            stage.job = latest.name
    progress = p.observed.progress if mine else None
    checkpoint = p.observed.checkpoint if mine else None
    return Current(run, stage, latest, progress, checkpoint)


def suspend(p: Pass, cur: Current) -> Decision | None:
    """Suspended: stop the running attempt, keep every checkpoint."""
    if not p.obj.spec.suspend:
        return None
    if cur.running:
        p.decision.actions.append(DeleteJob(cur.latest.name, "suspended"))
        p.event("Normal", c.SUSPEND_REQUESTED, f"suspended: deleted {cur.latest.name}")
    cur.stage.phase = "Suspended"
    cur.stage.message = "suspended; checkpoints kept"
    p.out.phase = "Suspended"
    return p.settle("suspended", c.SUSPEND_REQUESTED, "spec.suspend is true")


def _queue(p: Pass) -> str:
    name = p.obj.spec.scheduling.queue_name
    return f"queue {name}" if name else "its queue"


def held_by_queue(p: Pass, cur: Current) -> Decision | None:
    """An attempt held by its queue (Kueue admits a gang whole by unsuspending its Job, and
    preempts it by suspending it again): queued, and a preemption is a disruption, never
    counted; the same Job resumes from the last checkpoint once admitted again. A Job can
    be held without `gang: kueue` too (a Kueue that manages every Job of the namespace):
    only one seen running before was preempted."""
    if not (cur.running and cur.latest.suspended):
        return None
    run, stage, latest = cur.run, cur.stage, cur.latest
    if stage.admitted:
        stage.disruptions += 1
        resumes = f" from checkpoint {cur.checkpoint}" if cur.checkpoint is not None else ""
        p.event(
            "Warning",
            c.STAGE_DISRUPTED,
            f"stage {run.stage.name} attempt {latest.attempt} preempted by {_queue(p)}; "
            f"{latest.name} resumes{resumes} when admitted again",
        )
    why = f"stage {run.stage.name}: {latest.name} waits for admission by {_queue(p)}"
    stage.phase = "Queued"
    stage.admitted = False
    stage.message = why
    p.out.phase = "Queued"
    return p.settle("progressing", c.AWAITING_ADMISSION, why, PROGRESS_REFRESH_SECONDS)


def report_running(p: Pass, cur: Current) -> Decision | None:
    """An attempt is running: its progress, rates and the time left."""
    if not cur.running:
        return None
    run, stage, progress = cur.run, cur.stage, cur.progress
    if stage.phase == "Queued":
        stage.message = f"attempt {cur.latest.attempt} admitted by {_queue(p)}"
        p.event("Normal", c.STAGE_ADMITTED, f"stage {run.stage.name}: {stage.message}")
    stage.phase = "Running"
    stage.admitted = True
    if progress:
        stage.progress = f"{progress.step}/{progress.total}"
        p.out.progress = f"{p.out.progress} {run.stage.name} {stage.progress}"
        rate = progress.samples_per_second
        stage.samples_per_second = round(rate, 3) if rate else None
        epoch = p.now.replace(tzinfo=timezone.utc).timestamp()
        left, whole = eta.remaining(progress, p.runs[p.runs.index(run) + 1 :], epoch)
        stage.estimated_remaining_seconds = None if left is None else round(left)
        if whole is not None:
            p.out.estimated_remaining_seconds = round(whole)
            p.out.eta = eta.human(whole)
    if cur.checkpoint is not None:
        stage.last_checkpoint = cur.checkpoint
    p.out.phase = "Running"
    why = f"stage {run.stage.name} running"
    return p.settle("progressing", c.STAGE_RUNNING, why, PROGRESS_REFRESH_SECONDS)


def record_lost_failures(p: Pass, cur: Current) -> None:
    """Failed attempts before the latest that no status recorded: a pass that started the
    next attempt and then lost its status write to another pass (which decided on the
    resource as it was before) leaves the earlier attempt's end unrecorded, and the pass after
    sees only the new attempt running. Count them now, in order, as they would have been."""
    if cur.latest is None:
        return
    lost = [
        job
        for job in p.observed.jobs
        if job.stage == cur.run.stage.name
        and job.spec_hash == cur.run.spec_hash
        and job.finished == "Failed"
        and cur.stage.last_failure < job.attempt < cur.latest.attempt
    ]
    for job in sorted(lost, key=lambda j: j.attempt):
        _record_failure(p, cur, job)


def _record_failure(p: Pass, cur: Current, job: ObservedJob) -> bool:
    """Record how an attempt ended, once: a counted failure or a disruption, with its event.
    Whether it counts against the stage's restarts."""
    run, stage = cur.run, cur.stage
    counted = not job.disrupted or p.obj.spec.failure_policy.count_disruptions
    if stage.last_failure < job.attempt:
        stage.last_failure = job.attempt
        if counted:
            stage.restarts += 1
            p.out.restarts += 1
        else:
            stage.disruptions += 1
        stage.message = f"failed: {job.name}"
        kind = "disrupted" if job.disrupted else "failed"
        p.event(
            "Warning",
            c.STAGE_DISRUPTED if job.disrupted else c.STAGE_FAILED,
            f"stage {run.stage.name} attempt {job.attempt} {kind}: {job.message}"[:1000],
        )
    return counted


def count_failure(p: Pass, cur: Current) -> Decision | None:
    """The last attempt failed: count it (unless a disruption), give up, or back off."""
    run, stage, latest = cur.run, cur.stage, cur.latest
    failed = latest is not None and latest.finished == "Failed"
    if not failed or latest.attempt != stage.attempts:  # not one a suspend deleted
        return None
    policy = p.obj.spec.failure_policy
    counted = _record_failure(p, cur, latest)
    if stage.restarts > policy.max_restarts:
        stage.phase = p.out.phase = "Failed"
        why = (
            f"stage {run.stage.name} failed {stage.restarts} times "
            f"(maxRestarts {policy.max_restarts}): {latest.message}"
        )[:1000]
        return p.settle("exhausted", c.RESTARTS_EXHAUSTED, why)
    delay = (
        backoff(stage.restarts, policy.backoff_seconds, policy.max_backoff_seconds)
        if counted
        else 0.0
    )
    ready_at = (latest.finished_at or p.now) + timedelta(seconds=delay)
    if p.now >= ready_at:
        return None
    stage.phase = p.out.phase = "Pending"
    stage.retry_after = timestamp(ready_at)
    why = f"retrying {run.stage.name} at {stage.retry_after}"
    return p.settle("progressing", c.BACKOFF, why, (ready_at - p.now).total_seconds())


def start_attempt(p: Pass, cur: Current) -> Decision:
    """Start the next attempt (the first, a retry, or after a resume). When the current
    attempt's Job is missing because its create failed, create that same Job again."""
    run, stage, latest = cur.run, cur.stage, cur.latest
    missing = latest is None or latest.attempt < stage.attempts
    again = missing and stage.attempts > 0 and stage.phase != "Suspended"
    attempt = stage.attempts if again else stage.attempts + 1
    name = job_name(p.obj.metadata.name, run.stage.name, run.spec_hash, attempt)
    p.decision.actions.append(CreateAttempt(run, attempt, name))
    stage.attempts = attempt
    stage.job = name
    stage.admitted = False
    stage.start_time = stage.start_time or p.stamp
    stage.retry_after = None
    resumed = f" from checkpoint {cur.checkpoint}" if cur.checkpoint else ""
    queued = p.obj.spec.scheduling.gang == "kueue"  # created suspended: Kueue admits it whole
    waits = f", waiting for admission by {_queue(p)}" if queued else ""
    stage.message = f"attempt {attempt} started{resumed}{waits}"
    stage.phase = p.out.phase = "Queued" if queued else "Running"
    p.event(
        "Normal",
        c.STAGE_STARTED if attempt == 1 or again else c.STAGE_RESTARTED,
        f"stage {run.stage.name} attempt {attempt}: Job {name}{resumed}{waits}",
    )
    reason = c.AWAITING_ADMISSION if queued else c.STAGE_STARTING
    return p.settle("progressing", reason, f"stage {run.stage.name}: {stage.message}")


def _latest_job(jobs, run: StageRun, stage: StageStatus) -> ObservedJob | None:
    """The Job that speaks for this stage under its current spec: one still running if there
    is any (never start another beside it), else the newest attempt's."""
    mine = [j for j in jobs if j.stage == run.stage.name and j.spec_hash == run.spec_hash]
    live = [j for j in mine if j.finished is None]
    return max(live or mine, key=lambda j: j.attempt, default=None)


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
