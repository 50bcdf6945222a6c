"""The operator's pure decision function: table-driven cases and properties (hypothesis)."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amber import eta
from amber.api import AmberCompressionStatus
from amber.plan import plan
from amber.records import TERMINATION_MESSAGE_BYTES, ProgressRecord, StageResult
from amber.resource import parse
from amber_operator import conditions as c
from amber_operator import reconcile, render
from amber_operator.observe import job_state
from amber_operator.reconcile import (
    CreateAttempt,
    DeleteJob,
    Observed,
    ObservedJob,
    PublishFinal,
    backoff,
    decide,
    decide_invalid,
    job_name,
)

NOW = datetime(2026, 11, 26, 12, 0, 0)


def resource(**spec):
    doc = {
        "apiVersion": "amber.dev/v1alpha1",
        "kind": "AmberCompression",
        "metadata": {"name": "tiny", "namespace": "ml"},
        "spec": {
            "teacher": {"config": {"num_layers": 12}},
            "data": {"synthetic": {}},
            "storage": {"uri": "/tmp/store"},
            "preset": "amber-6b",
            "failurePolicy": {"maxRestarts": 2, "backoffSeconds": 10, "maxBackoffSeconds": 60},
            **spec,
        },
    }
    return parse(doc)


def job_for(obj, stage: str, attempt: int, finished=None, disrupted=False, result=None, at=NOW):
    run = next(r for r in plan(obj) if r.stage.name == stage)
    return ObservedJob(
        name=job_name("tiny", stage, run.spec_hash, attempt),
        stage=stage,
        spec_hash=run.spec_hash,
        attempt=attempt,
        finished=finished,
        finished_at=at if finished else None,
        disrupted=disrupted,
        message="boom" if finished == "Failed" else "",
        result=result,
    )


def committed(obj, *stages):
    return {r.stage.name: r.spec_hash for r in plan(obj) if r.stage.name in stages}


def step(obj, status=None, observed=None, now=NOW):
    return decide(obj, status or AmberCompressionStatus(), observed or Observed(), now, 1)


def cond(status, type_):
    return next(x for x in status.conditions if x.type == type_)


def test_a_new_resource_starts_its_first_stage():
    obj = resource()
    d = step(obj)
    [action] = d.actions
    assert isinstance(action, CreateAttempt) and action.run.stage.name == "score"
    assert action.attempt == 1 and action.job == job_name("tiny", "score", action.run.spec_hash, 1)
    assert d.status.phase == "Running" and d.status.current_stage == "score"
    assert d.status.stages[0].attempts == 1
    assert cond(d.status, c.RECONCILING).status == "True"
    assert [e.reason for e in d.events] == [c.STAGE_STARTED]


def test_running_job_is_left_alone_and_progress_is_reported():
    obj = resource()
    first = step(obj).status
    running = Observed(
        jobs=(job_for(obj, "score", 1),),
        stage="score",
        progress=ProgressRecord(step=3, total=6, time=NOW.replace(tzinfo=timezone.utc).timestamp()),
    )
    d = step(obj, first, running)
    assert d.actions == []
    assert d.status.progress == "0/5 score 3/6"
    assert d.events == []
    assert d.requeue_after == reconcile.PROGRESS_REFRESH_SECONDS  # progress read again


def test_a_running_stage_reports_its_rate_and_the_run_its_time_left():
    obj = resource()
    runs = plan(obj)
    assert [r.stage.type for r in runs] == ["score", "prune", "finetune", "fuse", "eval"]
    committed = {r.stage.name: r.spec_hash for r in runs[:2]}
    first = step(obj, observed=Observed(committed=committed)).status  # finetune's attempt 1
    finetune, fuse = runs[2], runs[3]
    per_step = eta.planned_samples(finetune) // finetune.stage.planned_steps()
    epoch = NOW.replace(tzinfo=timezone.utc).timestamp()
    total = finetune.stage.planned_steps()
    record = ProgressRecord(
        step=1000,
        total=total,
        time=epoch - 10,  # written 10 s before this pass
        steps_per_second=2.0,
        samples_per_second=2.0 * per_step,
        loss=0.5,
    )
    observed = Observed(
        jobs=(job_for(obj, "finetune", 1),),
        committed=committed,
        stage="finetune",
        progress=record,
    )
    d = step(obj, first, observed)
    stage = d.status.stages[2]
    left = (total - 1000) / 2.0 - 10
    assert stage.phase == "Running" and stage.progress == f"1000/{total}"
    assert stage.samples_per_second == 2.0 * per_step
    assert stage.estimated_remaining_seconds == round(left)
    # The fuse stage after it at the same rate in samples; score, prune and eval cost nothing.
    whole = left + eta.planned_samples(fuse) / (2.0 * per_step)
    assert d.status.estimated_remaining_seconds == round(whole)
    assert d.status.eta == eta.human(whole)
    # Once the stage's output is committed, its rate and time left go with it.
    done = {**committed, "finetune": finetune.spec_hash}
    after = step(obj, d.status, Observed(committed=done)).status
    assert after.stages[2].samples_per_second is None
    assert after.stages[2].estimated_remaining_seconds is None
    assert after.estimated_remaining_seconds is None and after.eta is None
    # A first record (no rate yet) shows the step, and no estimate.
    early = record.model_copy(update={"steps_per_second": None, "samples_per_second": None})
    d = step(obj, first, Observed(**{**observed.__dict__, "progress": early}))
    assert d.status.stages[2].progress == f"1000/{total}"
    assert d.status.eta is None and d.status.stages[2].estimated_remaining_seconds is None


def test_restarted_operator_finds_its_job_instead_of_creating_another():
    obj = resource()
    # The status write of the pass that created attempt 1 was lost.
    d = step(obj, AmberCompressionStatus(), Observed(jobs=(job_for(obj, "score", 1),)))
    assert d.actions == []
    assert d.status.stages[0].attempts == 1 and d.status.phase == "Running"


def test_an_attempt_whose_end_a_lost_status_write_left_unrecorded_still_counts():
    """A pass counted attempt 2's end and started attempt 3, then lost its status write to
    a pass that decided on the older status: the next pass sees attempt 3 running, and still
    records how attempt 2 ended (a real node's eviction found this: tests/test_node.py)."""
    obj = resource()
    before = step(obj, None, Observed(jobs=(job_for(obj, "score", 1),))).status
    before.stages[0].attempts, before.stages[0].last_failure = 2, 1
    before.stages[0].restarts = before.restarts = 1
    jobs = (
        job_for(obj, "score", 1, finished="Failed"),
        job_for(obj, "score", 2, finished="Failed", disrupted=True),
        job_for(obj, "score", 3),
    )
    d = step(obj, before, Observed(jobs=jobs))
    stage = d.status.stages[0]
    assert (stage.attempts, stage.restarts, stage.disruptions) == (3, 1, 1)
    assert stage.phase == "Running" and d.actions == []
    assert [e.reason for e in d.events] == [c.STAGE_DISRUPTED]
    # Recorded once: the pass after changes nothing.
    again = step(obj, d.status, Observed(jobs=jobs))
    assert again.status.stages[0].disruptions == 1 and again.events == []
    # A failure lost the same way counts against the restarts.
    failed = (jobs[0], replace(jobs[1], disrupted=False), jobs[2])
    d = step(obj, before, Observed(jobs=failed))
    assert (d.status.stages[0].restarts, d.status.restarts) == (2, 2)


def test_completed_job_moves_to_the_next_stage_in_the_same_pass():
    obj = resource()
    status = step(obj).status
    done = job_for(
        obj,
        "score",
        1,
        "Complete",
        result=StageResult(stage="score", status="Succeeded", output="s3://x", metrics={"a": 1}),
    )
    d = step(obj, status, Observed(jobs=(done,), committed=committed(obj, "score")))
    assert d.status.stages[0].phase == "Succeeded" and d.status.stages[0].output_uri == "s3://x"
    [action] = d.actions
    assert action.run.stage.name == "prune"
    assert d.status.progress == "1/5"


def test_a_job_that_exits_0_without_committing_is_a_counted_failure():
    obj = resource()
    status = step(obj).status
    done = job_for(obj, "score", 1, "Complete")
    d = step(obj, status, Observed(jobs=(done,)), NOW + timedelta(seconds=1))
    assert d.status.stages[0].phase == "Pending" and d.status.stages[0].restarts == 1
    assert d.actions == [] and d.status.current_stage == "score"
    [event] = d.events
    assert event.reason == c.STAGE_FAILED and "no committed output" in event.message


def test_progress_of_another_stage_is_not_reported_as_this_ones():
    obj = resource()
    status = step(obj, None, Observed(committed=committed(obj, "score"))).status
    d = step(obj, status, Observed(committed=committed(obj, "score"), stage="score", checkpoint=9))
    assert "checkpoint" not in d.status.stages[1].message


def test_failures_back_off_then_retry_then_give_up():
    obj = resource()
    status = step(obj).status
    failed = Observed(jobs=(job_for(obj, "score", 1, "Failed"),))
    waiting = step(obj, status, failed, NOW + timedelta(seconds=5))
    assert waiting.actions == [] and waiting.status.phase == "Pending"
    assert waiting.status.stages[0].restarts == 1 and waiting.requeue_after == 5
    assert [e.reason for e in waiting.events] == [c.STAGE_FAILED]
    # The same failure seen again is not counted twice.
    again = step(obj, waiting.status, failed, NOW + timedelta(seconds=6))
    assert again.status.stages[0].restarts == 1 and again.events == []
    retry = step(obj, again.status, failed, NOW + timedelta(seconds=11))
    [action] = retry.actions
    assert action.attempt == 2 and [e.reason for e in retry.events] == [c.STAGE_RESTARTED]
    # Attempt 2 fails: counted, backed off 20s, then attempt 3; it fails too and, with
    # maxRestarts 2, the run stalls.
    two = (failed.jobs[0], job_for(obj, "score", 2, "Failed", at=NOW + timedelta(seconds=12)))
    status = step(obj, retry.status, Observed(jobs=two), NOW + timedelta(seconds=13)).status
    assert status.stages[0].restarts == 2 and status.phase == "Pending"
    third = step(obj, status, Observed(jobs=two), NOW + timedelta(seconds=33))
    assert [a.attempt for a in third.actions] == [3]
    three = (*two, job_for(obj, "score", 3, "Failed", at=NOW + timedelta(seconds=40)))
    status = step(obj, third.status, Observed(jobs=three), NOW + timedelta(seconds=41)).status
    assert status.phase == "Failed"
    assert cond(status, c.STALLED).status == "True"
    assert cond(status, c.STALLED).reason == c.RESTARTS_EXHAUSTED


def test_disruptions_are_not_counted_and_retry_at_once():
    obj = resource()
    status = step(obj).status
    d = step(obj, status, Observed(jobs=(job_for(obj, "score", 1, "Failed", disrupted=True),)))
    assert d.status.stages[0].restarts == 0 and d.status.stages[0].disruptions == 1
    [action] = d.actions
    assert action.attempt == 2 and d.status.restarts == 0
    assert c.STAGE_DISRUPTED in [e.reason for e in d.events]


def test_suspend_deletes_the_running_job_and_resume_starts_a_new_attempt():
    obj = resource()
    status = step(obj).status
    running = Observed(jobs=(job_for(obj, "score", 1),), stage="score", checkpoint=4)
    suspended = step(resource(suspend=True), status, running)
    assert suspended.actions == [DeleteJob(running.jobs[0].name, "suspended")]
    assert suspended.status.phase == "Suspended"
    assert cond(suspended.status, c.SUSPENDED).status == "True"
    resumed = step(obj, suspended.status, Observed(stage="score", checkpoint=4))
    [action] = resumed.actions
    assert action.attempt == 2 and "from checkpoint 4" in resumed.events[0].message
    assert resumed.status.stages[0].restarts == 0


def test_spec_change_reruns_that_stage_and_later_ones_only():
    obj = resource()
    before = committed(obj, "score", "prune", "finetune")
    changed = resource(overrides={"finetune": {"steps": 7}})
    status = step(obj, None, Observed(committed=before)).status
    running = Observed(jobs=(job_for(obj, "fuse", 1),), committed=before)
    d = step(changed, status, running)
    assert DeleteJob(running.jobs[0].name, "its stage spec changed") in d.actions
    creates = [a for a in d.actions if isinstance(a, CreateAttempt)]
    assert [a.run.stage.name for a in creates] == ["finetune"]
    assert [s.phase for s in d.status.stages[:2]] == ["Succeeded", "Succeeded"]


def test_all_stages_done_publishes_once_and_is_ready():
    obj = resource()
    everything = committed(obj, *[r.stage.name for r in plan(obj)])
    d = step(obj, None, Observed(committed=everything))
    assert d.actions == [PublishFinal(tuple(d.status.stages))] and d.status.phase == "Succeeded"
    assert [s.attempts for s in d.actions[0].stages] == [0] * len(plan(obj))  # all reused
    assert cond(d.status, c.READY).status == "True"
    again = step(obj, d.status, Observed(committed=everything, final_committed=True))
    assert again.actions == [] and again.events == []
    assert (
        cond(again.status, c.READY).last_transition_time
        == cond(d.status, c.READY).last_transition_time
    )


def test_storage_errors_stall_without_actions():
    obj = resource()
    d = step(obj, None, Observed(storage_error="storage s3://b: AccessDenied"))
    # Retried every 30 s: Pending and Stalled, never the terminal Failed.
    assert d.actions == [] and d.status.phase == "Pending" and d.requeue_after == 30
    assert cond(d.status, c.STALLED).reason == c.STORAGE_UNAVAILABLE
    assert [e.reason for e in d.events] == [c.STORAGE_UNAVAILABLE]
    again = step(obj, d.status, Observed(storage_error="storage s3://b: AccessDenied"))
    assert again.events == []  # said once
    # A stage already running goes on: the resource is Running, still Stalled.
    running = Observed(jobs=(job_for(obj, "score", 1),), storage_error="storage s3://b: timeout")
    d = step(obj, d.status, running)
    assert d.status.phase == "Running" and cond(d.status, c.STALLED).status == "True"
    assert d.requeue_after == 30


def test_a_run_folder_held_by_a_local_run_starts_nothing():
    obj = resource()
    d = step(obj, None, Observed(held_by="amber-run pid 7 on laptop"))
    assert d.actions == [] and d.status.phase == "Pending"
    stalled = cond(d.status, c.STALLED)
    assert stalled.reason == c.FOLDER_HELD and "amber-run pid 7 on laptop" in stalled.message
    assert [e.reason for e in d.events] == [c.FOLDER_HELD]
    again = step(obj, d.status, Observed(held_by="amber-run pid 7 on laptop"))
    assert again.actions == [] and again.events == []  # one warning, not one per pass
    free = step(obj, again.status, Observed())
    assert [type(a).__name__ for a in free.actions] == ["CreateAttempt"]


def test_backoff_doubles_and_is_capped():
    assert [backoff(n, 10, 60) for n in range(6)] == [0, 10, 20, 40, 60, 60]


def test_job_names_are_deterministic_and_short():
    long = job_name("a" * 60, "finetune-6b-long-stage", "0123456789abcdef", 12)
    assert len(long) <= 52 and long.endswith("-01234-12")
    assert job_name("x", "score", "ffff0", 1) == "x-score-ffff0-1"


def test_job_state_reads_disruptions_and_termination_messages():
    base = {
        "metadata": {
            "name": "j",
            "labels": {
                render.LABEL_STAGE: "distill",
                render.LABEL_ATTEMPT: "2",
                render.LABEL_SPEC_HASH: "h",
            },
        }
    }
    disrupted = {
        **base,
        "status": {
            "failed": 1,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "PodFailurePolicy",
                    "message": "Pod ml/j-0 has condition DisruptionTarget matching FailJob rule "
                    "at index 0",
                    "lastTransitionTime": "2026-11-26T12:00:00Z",
                }
            ],
        },
    }
    state = job_state(disrupted)
    assert state.finished == "Failed" and state.disrupted and state.attempt == 2
    exit_code = json_like = {
        **base,
        "status": {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "message": "Container trainer for pod ml/j-0 failed with exit code 1 "
                    "matching FailJob rule at index 1",
                }
            ]
        },
    }
    assert not job_state(exit_code).disrupted
    done = {**base, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    msg = '{"stage": "distill", "status": "Succeeded", "output": "s3://o", "metrics": {}}'
    assert job_state(done, msg).result.output == "s3://o"
    # A container that died before reporting leaves its log's tail: kept as the message.
    died = {**base, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    state = job_state(died, "Traceback ...\nOSError: disk full")
    assert state.result is None and state.message.endswith("OSError: disk full")
    assert json_like is exit_code


def test_the_operators_settings_come_from_its_environment_and_name_a_bad_variable():
    from amber.errors import InvalidInput
    from amber_operator import settings as operator_settings

    env = {"AMBER_RECONCILE_INTERVAL": "2", "AMBER_TRAINER_SERVICE_ACCOUNT": "trainer"}
    found = operator_settings.from_environment(env, metrics_port=0)
    assert (found.reconcile_interval, found.workers, found.metrics_port) == (2.0, 32, 0)
    assert found.trainer_service_account == "trainer" and found.lease_ttl >= 6.0
    with pytest.raises(InvalidInput, match="AMBER_WORKERS"):
        operator_settings.from_environment({"AMBER_WORKERS": "many"})


def test_an_invalid_spec_fails_with_its_reason_and_starts_nothing():
    running = step(resource()).status
    d = decide_invalid(running, "spec.stages[1].type: unknown", NOW, 2)
    assert d.status.phase == "Failed" and not d.actions and d.requeue_after is None
    stalled, ready = cond(d.status, c.STALLED), cond(d.status, c.READY)
    assert (stalled.status, stalled.reason, ready.status) == ("True", c.INVALID_SPEC, "False")
    assert "spec.stages[1].type" in stalled.message and stalled.observed_generation == 2
    assert cond(d.status, c.RECONCILING) == cond(running, c.RECONCILING)  # left as it was
    assert [(e.type, e.reason) for e in d.events] == [("Warning", c.INVALID_SPEC)]
    assert d.status.stages == running.stages  # nothing forgotten for when it is fixed


def test_every_way_a_pass_ends_sets_all_four_conditions_consistently():
    # Ready is True only when everything succeeded; Stalled only where a person or a retry
    # is needed; each settled condition carries the pass's reason.
    for outcome, (ready, reconciling, stalled, suspended) in reconcile.OUTCOMES.items():
        assert ready is (outcome == "succeeded")
        assert stalled is (outcome in ("retrying", "exhausted", "invalid"))
        assert not (ready and reconciling) and not (stalled and reconciling)
        assert suspended is (outcome == "suspended") or suspended is None


def test_a_long_result_still_fits_a_termination_message_and_parses():
    long = StageResult(
        stage="eval",
        status="Failed",
        output="s3://o",
        metrics={f"metric{i}": [0.123456789] * 30 for i in range(40)},
        message="x" * 9000,
    )
    text = long.termination_message()
    assert len(text.encode()) <= TERMINATION_MESSAGE_BYTES
    kept = StageResult.parse(text)
    assert kept.status == "Failed" and kept.output == "s3://o" and kept.message.startswith("xxx")
    short = long.model_copy(update={"message": "boom"})
    assert StageResult.parse(short.termination_message()).metrics == {}  # metrics go first
    assert StageResult.parse(short.model_copy(update={"metrics": {"a": 1}}).termination_message())


# --- properties -----------------------------------------------------------------------------

STAGES = ["score", "prune", "finetune", "fuse", "eval"]
# More examples for a deeper search: AMBER_PROPERTY_EXAMPLES=5000 pytest tests/test_reconcile.py
EXAMPLES = int(os.environ.get("AMBER_PROPERTY_EXAMPLES", "300"))


@st.composite
def worlds(draw):
    obj = resource(suspend=draw(st.booleans()))
    runs = plan(obj)
    jobs = []
    for run in runs:
        for attempt in range(1, draw(st.integers(0, 3)) + 1):
            finished = draw(st.sampled_from([None, "Complete", "Failed"]))
            stale = draw(st.booleans())
            jobs.append(
                ObservedJob(
                    name=job_name(
                        "tiny", run.stage.name, "stale" if stale else run.spec_hash, attempt
                    ),
                    stage=run.stage.name,
                    spec_hash="stale" if stale else run.spec_hash,
                    attempt=attempt,
                    finished=finished,
                    finished_at=NOW - timedelta(seconds=draw(st.integers(0, 3600)))
                    if finished
                    else None,
                    disrupted=draw(st.booleans()),
                )
            )
    done = draw(st.lists(st.sampled_from(STAGES), unique=True))
    observed = Observed(
        jobs=tuple(jobs),
        committed=committed(obj, *done),
        stage=draw(st.none() | st.sampled_from(STAGES)),
        checkpoint=draw(st.none() | st.integers(0, 100)),
        final_committed=draw(st.booleans()),
        storage_error=draw(st.none() | st.just("denied")),
        held_by=draw(st.none() | st.just("amber-run pid 7 on laptop")),
    )
    status = AmberCompressionStatus()
    for _ in range(draw(st.integers(0, 3))):  # some history of earlier passes
        status = decide(obj, status, observed, NOW, 1).status
    return obj, status, observed


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_decide_never_raises_and_never_plans_two_live_attempts_of_a_stage(world):
    obj, status, observed = world
    d = decide(obj, status, observed, NOW, 1)
    creates = [a for a in d.actions if isinstance(a, CreateAttempt)]
    assert len(creates) <= 1
    for stage in d.status.stages:  # only storage says a stage is done
        if stage.phase == "Succeeded":
            assert observed.committed.get(stage.name) == stage.spec_hash
    deleted = {a.name for a in d.actions if isinstance(a, DeleteJob)}
    for create in creates:
        live = [
            j
            for j in observed.jobs
            if j.stage == create.run.stage.name and j.finished is None and j.name not in deleted
        ]
        assert live == [], "a new attempt while another still runs"
        assert create.job not in {j.name for j in observed.jobs}, "a duplicate Job name"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_decide_is_idempotent(world):
    obj, status, observed = world
    first = decide(obj, status, observed, NOW, 1)
    second = decide(obj, status, observed, NOW, 1)
    assert first.actions == second.actions and first.status == second.status
    # Feeding its own status back with nothing new observed creates nothing new.
    if first.actions and all(isinstance(a, CreateAttempt) for a in first.actions):
        created = tuple(
            ObservedJob(a.job, a.run.stage.name, a.run.spec_hash, a.attempt) for a in first.actions
        )
        again = decide(
            obj,
            first.status,
            Observed(jobs=observed.jobs + created, committed=observed.committed),
            NOW,
            1,
        )
        assert not [a for a in again.actions if isinstance(a, CreateAttempt)]


def test_a_job_whose_create_failed_is_created_again_under_the_same_name():
    obj = resource()
    first = step(obj)
    [created] = first.actions
    # The API call failed, so no Job exists; the status already says attempt 1.
    again = step(obj, first.status, Observed())
    assert again.actions == [created] and again.status.stages[0].attempts == 1


def test_a_kueue_gang_waits_for_admission_and_a_preemption_is_a_disruption():
    obj = resource(scheduling={"gang": "kueue", "queueName": "gpus"})
    created = step(obj)
    assert [type(a) for a in created.actions] == [CreateAttempt]
    assert created.status.phase == "Queued" and created.status.stages[0].phase == "Queued"
    waiting = cond(created.status, c.RECONCILING)
    assert waiting.reason == c.AWAITING_ADMISSION and "queue gpus" in waiting.message
    assert "waiting for admission by queue gpus" in created.events[0].message

    held = replace(job_for(obj, "score", 1), suspended=True)
    still = step(obj, created.status, Observed(jobs=(held,)))
    assert still.actions == [] and still.events == [] and still.status.phase == "Queued"
    assert still.requeue_after == reconcile.PROGRESS_REFRESH_SECONDS

    admitted = step(obj, still.status, Observed(jobs=(job_for(obj, "score", 1),)))
    assert admitted.actions == [] and admitted.status.phase == "Running"
    assert [e.reason for e in admitted.events] == [c.STAGE_ADMITTED]
    assert cond(admitted.status, c.RECONCILING).reason == c.STAGE_RUNNING

    # Kueue suspends the running Job to preempt it: a disruption, never a counted restart,
    # and the same Job (no new attempt) waits to be admitted again.
    preempted = step(obj, admitted.status, Observed(jobs=(held,), stage="score", checkpoint=20))
    score = preempted.status.stages[0]
    assert preempted.actions == [] and preempted.status.phase == "Queued"
    assert (score.disruptions, score.restarts, score.attempts) == (1, 0, 1)
    [event] = preempted.events
    assert event.reason == c.STAGE_DISRUPTED and "from checkpoint 20" in event.message
    again = step(obj, preempted.status, Observed(jobs=(held,)))
    assert again.status.stages[0].disruptions == 1 and again.events == []


def test_a_job_held_by_a_queue_the_resource_does_not_name_is_queued_not_preempted():
    # A Kueue that manages every Job of the namespace suspends this one as it is created.
    obj = resource()
    created = step(obj)
    assert created.status.phase == "Running" and not created.status.stages[0].admitted
    held = replace(job_for(obj, "score", 1), suspended=True)
    queued = step(obj, created.status, Observed(jobs=(held,)))
    assert queued.status.phase == "Queued" and queued.events == []
    assert queued.status.stages[0].disruptions == 0
    assert "waits for admission by its queue" in cond(queued.status, c.RECONCILING).message
    admitted = step(obj, queued.status, Observed(jobs=(job_for(obj, "score", 1),)))
    assert [e.message for e in admitted.events] == ["stage score: attempt 1 admitted by its queue"]
    assert admitted.status.stages[0].admitted


def test_without_a_queue_a_new_attempt_runs_at_once():
    d = step(resource(scheduling={"gang": "volcano", "queueName": "gpus"}))
    assert d.status.phase == "Running"
    assert cond(d.status, c.RECONCILING).reason == c.STAGE_STARTING
