"""Gang scheduling through Kueue's own manager (tests/kueue.py) and the operator: a stage's
pods are admitted whole or not at all, a gang beyond the quota waits with no pod started and
says so, and a stage Kueue preempts is a disruption that resumes from its checkpoint."""

from __future__ import annotations

import threading

import pytest
from kubernetes import client
from kueue import MANAGED, Kueue, queue

from amber import commits
from amber.storage import open_store
from argocd import health
from kube import apply, get, jobs_of, phase_is, wait_for
from trainer_helpers import FAST, tiny_resource

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PODS = 2  # every stage a gang of two pods with a GPU each


@pytest.fixture(scope="module")
def kueue(cluster, crd_installed, tmp_path_factory):
    manager = Kueue(cluster, cluster.binaries["kueue"], tmp_path_factory.mktemp("kueue"))
    yield manager.start()
    manager.stop()


@pytest.fixture
def managed(cluster, kueue, namespace):
    """The test's namespace, its Jobs managed by Kueue."""
    cluster.core.patch_namespace(namespace, {"metadata": {"labels": {MANAGED: "true"}}})
    return namespace


def gang(store, name: str, queue_name: str, stages: int, priority: str = "", **steps) -> dict:
    doc = tiny_resource(str(store), name=name, **{**FAST, **steps})
    doc["spec"]["stages"] = doc["spec"]["stages"][:stages]
    doc["spec"]["resources"] = {"pods": PODS, "gpusPerPod": 1}
    doc["spec"]["scheduling"] = {"gang": "kueue", "queueName": queue_name}
    if priority:
        doc["spec"]["scheduling"]["priorityClassName"] = priority
    return doc


def pods(cluster, namespace, job: str) -> list:
    return cluster.core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items


def stage_job(cluster, namespace, resource: str, stage: str):
    """The resource's one Job for `stage`, once it exists."""
    found = [
        j
        for j in jobs_of(cluster, namespace, stage)
        if j.metadata.labels["amber.dev/resource"] == resource
    ]
    return found[0] if found else None


def stage_status(cluster, namespace, resource: str, stage: str) -> dict:
    status = get(cluster, namespace, resource).get("status") or {}
    return next((s for s in status.get("stages", []) if s["name"] == stage), {})


def reasons(cluster, namespace, resource: str) -> list[str]:
    events = cluster.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={resource}"
    ).items
    return [f"{e.reason}: {e.message}" for e in events]


def condition(obj: dict, kind: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def test_a_gang_that_fits_is_admitted_whole_and_runs_to_the_end(
    cluster, kueue, managed, operator, tmp_path
):
    kueue.apply(*queue("fits", managed, gpus=PODS))
    apply(cluster, managed, gang(tmp_path / "store", "fits", "fits", stages=2))
    wait_for(phase_is(cluster, managed, "fits", "Succeeded"), 600, 1, "the run to succeed")

    # Each stage's Job went through Kueue: one Workload for the whole gang, admitted, and
    # finished once Kueue has seen its Job complete.
    def finished():
        found = kueue.workloads(managed)
        done = [condition(w, "Finished").get("status") == "True" for w in found]
        return found if len(found) == 2 and all(done) else None

    workloads = wait_for(finished, 60, 0.5, "both stages' Workloads to finish")
    for workload in workloads:
        [pod_set] = workload["spec"]["podSets"]
        assert pod_set["count"] == PODS
        assert condition(workload, "Admitted")["status"] == "True"
    for job in jobs_of(cluster, managed):
        assert job.status.succeeded == PODS
    said = reasons(cluster, managed, "fits")
    assert any(r.startswith("StageStarted") and "waiting for admission" in r for r in said), said
    assert any(r.startswith("StageAdmitted") for r in said), said
    for stage in get(cluster, managed, "fits")["status"]["stages"]:
        assert (stage["attempts"], stage["restarts"], stage["disruptions"]) == (1, 0, 0)


def test_gangs_beyond_the_quota_wait_whole_and_start_when_the_quota_frees(
    cluster, kueue, managed, operator, tmp_path
):
    """Three GPUs, two gangs of two: one runs, the other waits with no pod at all."""
    kueue.apply(*queue("tight", managed, gpus=PODS + 1))
    slow = {"score": {**FAST["score"], "calibrationSamples": 512}}  # time to look at "two"
    apply(cluster, managed, gang(tmp_path / "one", "one", "tight", stages=2, **slow))
    first = wait_for(lambda: stage_job(cluster, managed, "one", "score"), 120, 0.2, "one's Job")
    wait_for(lambda: pods(cluster, managed, first.metadata.name), 120, 0.2, "one's pods")

    # Watch every pod from now on: never two gangs' pods at once (the quota has room for one).
    overlap, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            live = {
                p.metadata.labels["job-name"]
                for p in cluster.core.list_namespaced_pod(managed).items
                if p.status.phase in ("Pending", "Running") and not p.metadata.deletion_timestamp
            }
            if len(live) > 1:
                overlap.append(sorted(live))
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        apply(cluster, managed, gang(tmp_path / "two", "two", "tight", stages=2))
        second = wait_for(
            lambda: stage_job(cluster, managed, "two", "score"), 120, 0.2, "two's Job"
        )
        wait_for(phase_is(cluster, managed, "two", "Queued"), 60, 0.2, "two to be Queued")
        assert stage_job(cluster, managed, "one", "score").status.completion_time is None
        assert (
            client.BatchV1Api(cluster.api)
            .read_namespaced_job(second.metadata.name, managed)
            .spec.suspend
        )
        assert pods(cluster, managed, second.metadata.name) == []
        status = get(cluster, managed, "two")["status"]
        waiting = condition({"status": status}, "Reconciling")
        assert waiting["reason"] == "AwaitingAdmission" and "queue tight" in waiting["message"]
        assert stage_status(cluster, managed, "two", "score")["phase"] == "Queued"
        assert health(get(cluster, managed, "two")) == ("Progressing", waiting["message"])
        row = cluster.kubectl("get", "amc", "two", "-n", managed).stdout.splitlines()[1]
        assert " Queued " in f" {row} ", row

        # One's gang ends: two's is admitted (it queued first), one's next stage waits.
        wait_for(lambda: pods(cluster, managed, second.metadata.name), 600, 0.5, "two's pods")
        wait_for(phase_is(cluster, managed, "two", "Succeeded"), 600, 1, "two to succeed")
        wait_for(phase_is(cluster, managed, "one", "Succeeded"), 600, 1, "one to succeed")
    finally:
        stop.set()
        watcher.join()

    assert overlap == [], overlap[:5]
    for name in ("one", "two"):
        said = reasons(cluster, managed, name)
        assert any(r.startswith("StageAdmitted") for r in said), said
        for stage in get(cluster, managed, name)["status"]["stages"]:
            assert (stage["restarts"], stage["disruptions"]) == (0, 0)


def test_a_stage_preempted_by_its_queue_resumes_from_its_checkpoint(
    cluster, kueue, managed, operator, tmp_path
):
    kueue.apply(*queue("prio", managed, gpus=PODS))
    long = {"distill": {**FAST["distill"], "steps": 400, "checkpointEvery": 10}}
    apply(cluster, managed, gang(tmp_path / "low", "low", "prio", 3, "amber-low", **long))
    store = open_store(str(tmp_path / "low" / managed / "low"))
    wait_for(lambda: commits.latest_checkpoint(store, "distill"), 600, 0.2, "a distill checkpoint")
    job = stage_job(cluster, managed, "low", "distill")

    apply(cluster, managed, gang(tmp_path / "high", "high", "prio", 2, "amber-high"))
    batch = client.BatchV1Api(cluster.api)
    wait_for(
        lambda: batch.read_namespaced_job(job.metadata.name, managed).spec.suspend,
        120,
        0.2,
        "Kueue to preempt the low-priority stage",
    )
    wait_for(lambda: not pods(cluster, managed, job.metadata.name), 120, 0.2, "its pods to go")
    wait_for(phase_is(cluster, managed, "low", "Queued"), 60, 0.2, "low to be Queued")
    distill = stage_status(cluster, managed, "low", "distill")
    assert (distill["disruptions"], distill["restarts"], distill["attempts"]) == (1, 0, 1)
    said = reasons(cluster, managed, "low")
    assert any(r.startswith("StageDisrupted") and "preempted by queue prio" in r for r in said)

    # The high-priority run finishes; the same Job is admitted again and resumes.
    wait_for(phase_is(cluster, managed, "high", "Succeeded"), 600, 1, "high to succeed")
    wait_for(
        lambda: (
            '"event": "resumed"'
            in cluster.runner.logs(
                lambda pod: pod.metadata.labels.get("job-name") == job.metadata.name
            )
        ),
        300,
        0.5,
        "the preempted stage to resume from its checkpoint",
    )
    wait_for(phase_is(cluster, managed, "low", "Running"), 60, 0.2, "low to run again")
    distill = stage_status(cluster, managed, "low", "distill")
    assert (distill["disruptions"], distill["restarts"], distill["attempts"]) == (1, 0, 1)
    assert [j.metadata.name for j in jobs_of(cluster, managed, "distill")] == [job.metadata.name]
    cluster.kubectl("delete", "amc", "low", "-n", managed, "--wait=true")
    wait_for(lambda: not cluster.runner.running(), 120, 0.5, "the trainer to stop")
