"""The operator against the real control plane, with the pod runner executing real trainer
processes: kubectl apply -> operator -> Jobs -> pods -> trainer -> storage -> next stage."""

from __future__ import annotations

import json
import logging
import os
import re
import time

import pytest
import yaml
from kubernetes import client

from amber import commits
from amber.storage import S3Store, open_store, s3_client
from argocd import health
from kube import GROUP, PLURAL, VERSION, Operator, apply, get, jobs_of, phase_is, wait_for
from trainer_helpers import FAST, tiny_resource

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_tiny_pipeline_runs_to_the_final_model(cluster, namespace, operator, s3_endpoint):
    import boto3

    keys = {"AWS_ACCESS_KEY_ID": "amber-e2e", "AWS_SECRET_ACCESS_KEY": "amber-e2e-secret"}
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
    ).create_bucket(Bucket=namespace)
    cluster.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "amber-s3"}, "stringData": keys}
    )
    doc = tiny_resource(f"s3://{namespace}/runs", name="tiny")
    doc["spec"]["storage"].update(
        endpoint=s3_endpoint, region="us-east-1", credentialsSecret={"name": "amber-s3"}
    )
    apply(cluster, namespace, doc)
    wait_for(phase_is(cluster, namespace, "tiny", "Succeeded"), 900, 1, "the pipeline")

    status = get(cluster, namespace, "tiny")["status"]
    assert [s["phase"] for s in status["stages"]] == ["Succeeded"] * 6
    assert all(s["attempts"] == 1 for s in status["stages"])
    assert status["finalUri"] == f"s3://{namespace}/runs/{namespace}/tiny/final"
    assert status["reportUri"] == f"s3://{namespace}/runs/{namespace}/tiny/report.html"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert health(get(cluster, namespace, "tiny"))[0] == "Healthy"  # as Argo CD shows it
    stages = [j.metadata.labels["amber.dev/stage"] for j in jobs_of(cluster, namespace)]
    assert sorted(stages) == sorted(s["name"] for s in status["stages"])  # one Job each
    # The final model sits in the loopback S3 bucket, committed.
    store = S3Store(
        namespace,
        f"runs/{namespace}/tiny",
        client=s3_client(s3_endpoint, "us-east-1", *keys.values()),
    )
    assert commits.read_manifest(store, "final") is not None
    page = store.read_text("report.html")  # written by the operator, from the bucket
    assert page.count('class="committed">committed') == 6 and "data:image/png;base64," in page
    # Attempts from the status (the operator keeps no run history): one Job each.
    assert len(re.findall(r'class="committed">committed</td>\s*<td class="num">1</td>', page)) == 6
    assert store.exists("final/config.json") and store.exists("final/README.md")
    # What a person sees.
    table = cluster.kubectl("get", "amc", "-n", namespace).stdout
    assert "Succeeded" in table and "6/6" in table
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert {"StageStarted", "StageSucceeded", "FinalPublished"} <= reasons


def test_finished_jobs_start_the_next_stage_at_once_not_at_the_timer(cluster, namespace, tmp_path):
    # The timer is only the safety net: at 300 s it does not fire again during this test.
    op = Operator(cluster, namespace, tmp_path / "operator.log", interval=300).start()
    try:
        doc = tiny_resource(str(tmp_path / "store"), name="events")
        doc["spec"]["stages"] = doc["spec"]["stages"][:2]  # score, then prune
        apply(cluster, namespace, doc)
        wait_for(phase_is(cluster, namespace, "events", "Succeeded"), 240, 0.5, "the pipeline")
    finally:
        op.kill()
    [score] = jobs_of(cluster, namespace, "score")
    [prune] = jobs_of(cluster, namespace, "prune")
    waited = prune.metadata.creation_timestamp - score.status.completion_time
    assert waited.total_seconds() <= 10, waited  # the Job's event, not a 300 s tick


def test_retries_start_when_their_backoff_ends_not_at_the_timer(cluster, namespace, tmp_path):
    # A stage that fails every time (its teacher is missing), retried after 6 s: the decision
    # asks for a pass then, and the 300 s timer has no part in it.
    op = Operator(cluster, namespace, tmp_path / "operator.log", interval=300).start()
    try:
        doc = tiny_resource(str(tmp_path / "store"), name="backoff")
        doc["spec"]["teacher"] = {"uri": str(tmp_path / "no-model-here")}
        doc["spec"]["stages"] = doc["spec"]["stages"][:1]
        doc["spec"]["failurePolicy"] = {"maxRestarts": 1, "backoffSeconds": 6}
        apply(cluster, namespace, doc)
        try:
            wait_for(lambda: len(jobs_of(cluster, namespace, "score")) == 2, 90, 0.5, "attempt 2")
        except TimeoutError:
            status = get(cluster, namespace, "backoff").get("status")
            raise AssertionError(f"no attempt 2; status: {json.dumps(status)}") from None

        def started_twice():  # the requeued pass posts its events like any other
            raw = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
            reasons = [e["message"] for e in json.loads(raw)["items"]]
            return any("score attempt 2" in m for m in reasons)

        wait_for(started_twice, 30, 0.5, "the StageStarted event of attempt 2")
    finally:
        op.kill()
    first, second = sorted(jobs_of(cluster, namespace, "score"), key=lambda j: j.metadata.name)
    failed = next(c for c in first.status.conditions if c.type == "Failed")
    waited = (second.metadata.creation_timestamp - failed.last_transition_time).total_seconds()
    assert 5 <= waited <= 15, waited  # the backoff (timestamps are whole seconds)
    log = (tmp_path / "operator.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def test_standby_takes_over_when_the_active_operator_dies(cluster, namespace, tmp_path):
    from test_chart import CHART, helm

    # The chart's peering objects for two replicas watching this namespace: CRDs, then the
    # KopfPeering that the replicas meet in.
    rendered = helm(
        cluster, "template", "amber-operator", str(CHART), "--set", "replicas=2",
        "--set", f"watchNamespaces={{{namespace}}}", "--show-only", "templates/peering.yaml",
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    for kind in ("CustomResourceDefinition", "KopfPeering"):
        for doc in (d for d in docs if d["kind"] == kind):
            cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
            if kind == "CustomResourceDefinition":
                name = f"crd/{doc['metadata']['name']}"
                cluster.kubectl("wait", "--for=condition=Established", name)
    lifetime = 10
    peering = ["--peering", "amber-operator", "--peering-lifetime", str(lifetime)]

    def replica(role, priority):
        log = tmp_path / f"{role}.log"
        return Operator(cluster, namespace, log, peering=[*peering, "--priority", priority])

    def peers():
        found = client.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
            "kopf.dev", "v1", namespace, "kopfpeerings", "amber-operator"
        )
        return [identity for identity, peer in (found.get("status") or {}).items() if peer]

    resuming = "Resuming operations after the pause"
    active, standby = replica("active", "200"), replica("standby", "100")
    try:
        # The active replica first, working; then the standby, which finds it there.
        active.start()
        wait_for(lambda: resuming in active.log_path.read_text(), 60, 0.5, "the active one")
        standby.start()
        wait_for(lambda: len(peers()) == 2, 60, 0.5, "the standby in the peering object")
        time.sleep(2)  # its watch of the peering object has delivered the active replica
        doc = tiny_resource(str(tmp_path / "store"), name="standby")
        doc["spec"]["stages"] = doc["spec"]["stages"][:3]  # score, prune, the warm start
        apply(cluster, namespace, doc)
        wait_for(lambda: jobs_of(cluster, namespace, "score"), 60, 0.2, "the score Job")
        before = standby.log_path.read_text()
        assert resuming not in before, before[-2000:]  # it stood by while the active lived
        active.kill()  # SIGKILL: no goodbye in the peering object
        killed = time.monotonic()
        wait_for(
            lambda: resuming in standby.log_path.read_text()[len(before) :],
            lifetime + 30,
            0.2,
            "the standby to take over",
        )
        takeover = time.monotonic() - killed
        print(f"standby took over {takeover:.1f} s after SIGKILL (lifetime {lifetime} s)")
        wait_for(phase_is(cluster, namespace, "standby", "Succeeded"), 600, 0.5, "the pipeline")
    finally:
        active.kill()
        standby.kill()
    assert takeover <= lifetime + 5, takeover
    for stage in ("score", "prune", "distill"):
        [job] = jobs_of(cluster, namespace, stage)  # no duplicate across the handover
        assert job.metadata.name.endswith("-1")
    status = get(cluster, namespace, "standby")["status"]
    assert [s["phase"] for s in status["stages"]] == ["Succeeded"] * 3
    assert all(s["attempts"] == 1 and s["restarts"] == 0 for s in status["stages"])


def test_pod_failure_and_operator_restart_lose_nothing(cluster, namespace, operator, tmp_path):
    store_dir = tmp_path / "store"
    # The warm start named other than its type: Jobs and status go by name, metrics by type.
    warm = {**FAST["distill"], "name": "warm", "steps": 60, "checkpointEvery": 10}
    apply(cluster, namespace, tiny_resource(str(store_dir), name="faults", distill=warm))
    run_store = open_store(str(store_dir / namespace / "faults"))
    wait_for(lambda: commits.latest_checkpoint(run_store, "warm"), 600, 0.2, "a checkpoint")

    # A pod of the stage dies (its process is killed): a new attempt resumes.
    [job] = jobs_of(cluster, namespace, "warm")
    killed = cluster.runner.kill_pods(
        lambda pod: pod.metadata.labels.get("job-name") == job.metadata.name
    )
    assert killed == 1
    wait_for(lambda: len(jobs_of(cluster, namespace, "warm")) == 2, 120, 0.5, "attempt 2")
    restarts = 'amber_stage_restarts_total{kind="failure",type="distill"} 1.0'
    wait_for(lambda: restarts in operator.metrics(), 30, 0.5, "the restart in the metrics")

    # The operator dies mid-stage and comes back: it finds attempt 2 and creates nothing new.
    operator.kill()
    time.sleep(2)
    operator.start()
    wait_for(phase_is(cluster, namespace, "faults", "Succeeded"), 900, 1, "the pipeline")

    status = get(cluster, namespace, "faults")["status"]
    stage = next(s for s in status["stages"] if s["name"] == "warm")
    assert stage["attempts"] == 2 and stage["restarts"] == 1
    assert len(jobs_of(cluster, namespace, "warm")) == 2  # no duplicate after the restart
    assert all(len(jobs_of(cluster, namespace, s)) == 1 for s in ("score", "prune", "finetune"))
    metrics = json.loads(run_store.read_text("warm/output/metrics.json"))
    assert len(metrics["loss"]) == 60  # the curve is whole: resumed, not restarted from zero
    log = cluster.runner.logs(lambda pod: pod.metadata.labels.get("job-name", "").endswith("-2"))
    assert '"event": "resumed"' in log


def wait_running_stage(cluster, namespace, name, stage, store):
    """Until `stage` runs and has committed a checkpoint; its Job."""
    wait_for(lambda: commits.latest_checkpoint(store, stage), 600, 0.2, f"a {stage} checkpoint")
    jobs = [j for j in jobs_of(cluster, namespace, stage) if not j.status.completion_time]
    return jobs[-1]


def patch_spec(cluster, namespace, name, spec):
    client.CustomObjectsApi(cluster.api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}
    )


def test_suspend_resume_then_delete_mid_stage(cluster, namespace, operator, tmp_path):
    store_dir = tmp_path / "store"
    steps = {**FAST, "distill": {**FAST["distill"], "steps": 400, "checkpointEvery": 10}}
    apply(cluster, namespace, tiny_resource(str(store_dir), name="pause", **steps))
    store = open_store(str(store_dir / namespace / "pause"))
    first = wait_running_stage(cluster, namespace, "pause", "distill", store)

    # While it runs: its rate and the time left in the status, `kubectl get` and the metrics.
    def eta_shown():
        status = get(cluster, namespace, "pause")["status"]
        stage = next(s for s in status["stages"] if s["name"] == "distill")
        return stage.get("samplesPerSecond") and status.get("eta")

    wait_for(eta_shown, 90, 0.5, "the stage's rate and the run's ETA")
    labels = f'namespace="{namespace}",resource="pause"'
    series = [
        f'amber_stage_progress_ratio{{{labels},stage="distill",type="distill"}}',
        f'amber_stage_samples_per_second{{{labels},stage="distill",type="distill"}}',
        f'amber_stage_eta_seconds{{{labels},stage="distill",type="distill"}}',
        f"amber_pipeline_eta_seconds{{{labels}}}",
    ]
    wait_for(lambda: all(s in operator.metrics() for s in series), 30, 0.5, "the gauges")
    header, row = cluster.kubectl("get", "amc", "pause", "-n", namespace).stdout.splitlines()
    assert "ETA" in header.split()
    assert re.search(r" \d+(s|m\d\ds|h\d\dm|d\d\dh) ", row), row  # 42s, 5m10s, 3h07m

    patch_spec(cluster, namespace, "pause", {"suspend": True})
    wait_for(phase_is(cluster, namespace, "pause", "Suspended"), 120, 0.5, "Suspended")
    wait_for(lambda: not jobs_of(cluster, namespace, "distill"), 120, 0.5, "the Job to go")
    wait_for(lambda: not cluster.runner.running(), 120, 0.5, "the trainer to stop")
    kept = commits.latest_checkpoint(store, "distill")
    assert kept is not None  # suspending keeps every checkpoint
    status = get(cluster, namespace, "pause")["status"]
    assert next(c for c in status["conditions"] if c["type"] == "Suspended")["status"] == "True"
    assert health(get(cluster, namespace, "pause"))[0] == "Suspended"  # as Argo CD shows it

    patch_spec(cluster, namespace, "pause", {"suspend": False})
    wait_for(lambda: jobs_of(cluster, namespace, "distill"), 120, 0.5, "a new attempt")
    [second] = jobs_of(cluster, namespace, "distill")
    assert second.metadata.name != first.metadata.name
    wait_for(
        lambda: (
            '"event": "resumed"'
            in cluster.runner.logs(
                lambda pod: pod.metadata.labels.get("job-name") == second.metadata.name
            )
        ),
        300,
        0.5,
        "the trainer to resume from its checkpoint",
    )
    status = get(cluster, namespace, "pause")["status"]
    distill = next(s for s in status["stages"] if s["name"] == "distill")
    assert distill["restarts"] == 0  # a suspend is not a failure

    # Deleting the resource mid-stage removes every child and stops the trainer.
    cluster.kubectl("delete", "amc", "pause", "-n", namespace, "--wait=true")
    wait_for(lambda: not jobs_of(cluster, namespace), 120, 0.5, "the Jobs to be collected")
    wait_for(
        lambda: (
            not cluster.core.list_namespaced_config_map(
                namespace, label_selector="amber.dev/resource"
            ).items
        ),
        120,
        0.5,
        "the ConfigMaps to be collected",
    )
    wait_for(lambda: not cluster.runner.running(), 120, 0.5, "the trainer to stop")


def test_disruption_is_retried_without_counting(cluster, namespace, operator, tmp_path):
    store_dir = tmp_path / "store"
    steps = {**FAST, "distill": {**FAST["distill"], "steps": 400, "checkpointEvery": 10}}
    apply(cluster, namespace, tiny_resource(str(store_dir), name="preempt", **steps))
    store = open_store(str(store_dir / namespace / "preempt"))
    job = wait_running_stage(cluster, namespace, "preempt", "distill", store)
    hit = cluster.runner.disrupt_pods(
        lambda pod: pod.metadata.labels.get("job-name") == job.metadata.name
    )
    assert hit == 1
    wait_for(lambda: len(jobs_of(cluster, namespace, "distill")) == 2, 120, 0.5, "attempt 2")

    def distill_status():
        status = get(cluster, namespace, "preempt")["status"]
        return next(s for s in status["stages"] if s["name"] == "distill")

    # The operator creates attempt 2, then writes the status of that pass: wait for it.
    wait_for(lambda: distill_status().get("disruptions") == 1, 60, 0.5, "the status write")
    assert distill_status()["restarts"] == 0
    events = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)
    assert "StageDisrupted" in {e["reason"] for e in events["items"]}
    cluster.kubectl("delete", "amc", "preempt", "-n", namespace, "--wait=true")
    wait_for(lambda: not cluster.runner.running(), 120, 0.5, "the trainer to stop")


def test_stale_body_pass_never_undoes_a_newer_status(cluster, namespace, tmp_path):
    """Two passes can start from the same old body (a Job watch event reads the resource from
    the index, the timer from its last event): the later must decide again on the resource as
    it is now, not write back counts from before the earlier pass. In-process, so the test
    chooses the bodies."""
    import kopf

    from amber_operator import handlers
    from amber_operator.requeue import Requeue
    from amber_operator.settings import Settings

    doc = tiny_resource(str(tmp_path / "store"), name="stale")
    doc["spec"]["suspend"] = True  # passes write a status and start nothing
    apply(cluster, namespace, doc)
    old = kopf.Body(get(cluster, namespace, "stale"))
    memo = kopf.Memo(api=cluster.api, requeue=Requeue(lambda key: None), settings=Settings())
    handlers.reconcile(old, memo, logging.getLogger("test"))
    status = get(cluster, namespace, "stale")["status"]
    assert status["phase"] == "Suspended"
    # Another pass counted a disruption meanwhile.
    status["stages"][0]["disruptions"] = 1
    client.CustomObjectsApi(cluster.api).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "stale", {"status": {"stages": status["stages"]}}
    )
    handlers.reconcile(old, memo, logging.getLogger("test"))  # the body from before both
    assert get(cluster, namespace, "stale")["status"]["stages"][0]["disruptions"] == 1


def test_unreadable_storage_stalls_clearly_without_crashing(cluster, namespace, operator, tmp_path):
    doc = tiny_resource("s3://amber-missing-bucket/runs", name="nocreds")
    doc["spec"]["storage"]["credentialsSecret"] = {"name": "no-such-secret"}
    apply(cluster, namespace, doc)

    def stalled():
        status = get(cluster, namespace, "nocreds").get("status") or {}
        return next(
            (
                c
                for c in status.get("conditions", [])
                if c["type"] == "Stalled" and c["status"] == "True"
            ),
            None,
        )

    condition = wait_for(stalled, 120, 0.5, "a Stalled condition")
    assert condition["reason"] == "StorageUnavailable"
    assert "no-such-secret" in condition["message"]
    status, message = health(get(cluster, namespace, "nocreds"))
    assert status == "Degraded" and "no-such-secret" in message
    events = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)
    assert "StorageUnavailable" in {e["reason"] for e in events["items"]}
    assert jobs_of(cluster, namespace) == []
    time.sleep(3)
    assert operator.proc.poll() is None  # still serving, not crash-looping


def test_a_local_run_and_the_operator_never_share_a_run_folder(
    cluster, namespace, operator, tmp_path
):
    from amber import lease
    from amber.errors import RunLocked

    store_dir = tmp_path / "store"
    doc = tiny_resource(str(store_dir), name="shared")
    run_store = open_store(str(store_dir / namespace / "shared"))
    local = lease.acquire(run_store, "amber-run")  # as `amber run` on the same store holds it
    apply(cluster, namespace, doc)

    def condition(type_, reason):
        status = get(cluster, namespace, "shared").get("status") or {}
        found = status.get("conditions", [])
        return next((c for c in found if (c["type"], c["reason"]) == (type_, reason)), None)

    held = wait_for(
        lambda: condition("Stalled", "RunFolderHeld"), 120, 0.5, "Stalled: RunFolderHeld"
    )
    assert held["status"] == "True" and f"amber-run pid {os.getpid()}" in held["message"]
    assert condition("Ready", "RunFolderHeld")["status"] == "False"
    time.sleep(3)
    assert jobs_of(cluster, namespace) == []  # nothing started while the folder is held
    local.release()

    wait_for(lambda: jobs_of(cluster, namespace), 120, 0.5, "a stage Job")
    holder, _ = lease.read(run_store)
    assert holder.kind == "operator"
    with pytest.raises(RunLocked, match="being run by operator"):
        lease.acquire(run_store, "amber-run")
