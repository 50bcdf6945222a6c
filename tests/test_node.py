"""The whole path with real containers, on a real node (tests/node.py): the chart's operator
Deployment from the image built out of images/operator, trainer gangs of two pods from the
image built out of images/trainer (non-root, read-only root filesystem, Pod Security's
"restricted" level enforced on their namespace), rendezvous through pod 0's hostname under
the headless Service and cluster DNS, checkpoints to S3 reached over the pod network, the
termination message the operator reads; then a trainer container killed mid-stage (the next
attempt resumes) and a pod evicted (a disruption, not a failure).

Slow (the images' first build takes minutes; docs/testing.md): one test, one node."""

from __future__ import annotations

import json
import time

import boto3
import pytest
import yaml
from kubernetes import client

from amber import commits
from amber.records import StageResult
from amber.storage import open_store
from kube import GROUP, PLURAL, VERSION, wait_for
from kube import INDEX_ANNOTATION as INDEX
from test_chart import CHART, RELEASE, SYSTEM, denied, helm, running_operator
from trainer_helpers import TINY_YAML

# Cold, the fixture builds the images first (docs/testing.md): longer than the usual limit.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(2400)]

WATCHED = "real-runs"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "amber-test", "AWS_SECRET_ACCESS_KEY": "amber-test-secret"}
TWO_PODS = {"resources": {"pods": 2, "gpusPerPod": 0}}


@pytest.fixture(scope="module")
def node():
    from kube import build
    from node import Node, build_images

    running = Node(build(), build_images()).start()
    yield running
    running.stop()


def resource(bucket: str, endpoint: str) -> dict:
    """The plumbing example's random teacher and synthetic data; both training stages in
    gangs of two pods, the finetune long enough to be interrupted twice."""
    example = yaml.safe_load(TINY_YAML.read_text())["spec"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AmberCompression",
        "metadata": {"name": "real", "namespace": WATCHED},
        "spec": {
            "teacher": example["teacher"],
            "data": example["data"],
            "storage": {
                "uri": f"s3://{bucket}/runs",
                "endpoint": endpoint,
                "region": "us-east-1",
                "credentialsSecret": {"name": "s3"},
            },
            "resources": {"pods": 1, "gpusPerPod": 0},
            "deepspeed": {"zeroStage": 0, "precision": "fp32", "activationCheckpointing": False},
            "stages": [
                {"type": "score", "targetLayers": 6, "calibrationSamples": 8},
                {"type": "prune", "fitSamples": 16},
                {"type": "distill", "steps": 10, "microBatchSize": 4, **TWO_PODS},
                {
                    "type": "finetune",
                    "steps": 240,
                    "microBatchSize": 4,
                    "checkpointEvery": 10,
                    **TWO_PODS,
                },
            ],
        },
    }


def test_the_chart_runs_a_compression_in_real_containers(node, monkeypatch, record_property):
    from node import sizes

    record_property("image sizes", sizes(node.images))  # conftest prints it at the end
    cluster = node.cluster
    endpoint = node.s3()
    for var, value in CREDENTIALS.items():  # this side reads the bucket with them too
        monkeypatch.setenv(var, value)
    bucket = f"real-{int(time.time())}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    # Trainers must meet Pod Security's "restricted" level to be admitted at all.
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    cluster.core.create_namespace({"metadata": {"name": WATCHED, "labels": labels}})
    cluster.core.create_namespaced_secret(
        WATCHED, {"metadata": {"name": "s3"}, "stringData": CREDENTIALS}
    )
    helm(
        cluster, "install", RELEASE, str(CHART), "-n", SYSTEM, "--create-namespace",
        "--set", f"watchNamespaces={{{WATCHED}}}", "--set", "reconcileInterval=2",
        "--wait", "--timeout", "3m",
    )  # fmt: skip
    try:
        operator = wait_for(lambda: running_operator(cluster), 120, 0.5, "the operator pod")
        assert operator.status.container_statuses[0].image.endswith("amber-operator:0.1.0")
        cluster.kubectl("apply", "-f", "-", input=json.dumps(resource(bucket, endpoint)))
        store = open_store(
            f"s3://{bucket}/runs/{WATCHED}/real", endpoint=endpoint, region="us-east-1"
        )
        run_the_compression(node, store)
        log = cluster.kubectl("logs", "-n", SYSTEM, operator.metadata.name).stdout
        assert not denied(log), denied(log)[:3]
    except BaseException:
        print(cluster.kubectl("get", "pods,jobs", "-A", "-o", "wide", check=False).stdout)
        print(cluster.kubectl("get", "events", "-n", WATCHED, check=False).stdout[-4000:])
        raise
    finally:
        helm(cluster, "uninstall", RELEASE, "-n", SYSTEM, "--wait", check=False)


def run_the_compression(node, store) -> None:
    cluster = node.cluster
    objects = client.CustomObjectsApi(cluster.api)

    def status() -> dict:
        obj = objects.get_namespaced_custom_object(GROUP, VERSION, WATCHED, PLURAL, "real")
        return obj.get("status") or {}

    def stage(name: str) -> dict:
        return next((s for s in status().get("stages", []) if s["name"] == name), {})

    # Distill: a gang of two that met through pod 0's name, and told the operator its result.
    wait_for(lambda: stage("distill").get("phase") == "Succeeded", 900, 1, "distill")
    gang = pods_of(cluster, "distill")
    assert len(gang) == 2
    rank0 = next(p for p in gang if p.metadata.annotations[INDEX] == "0").metadata.name

    def terminated():
        pod = cluster.core.read_namespaced_pod(rank0, WATCHED)
        return pod.status.container_statuses[0].state.terminated

    result = StageResult.parse(wait_for(terminated, 120, 0.5, "distill's rank 0").message)
    assert result is not None and result.status == "Succeeded", result
    assert result.output and result.output.endswith("/distill/output"), result

    # Finetune: a trainer container killed after a checkpoint; the next attempt resumes.
    wait_for(lambda: commits.latest_checkpoint(store, "finetune"), 600, 0.5, "a checkpoint")
    running = wait_for(lambda: running_pods(cluster, "finetune"), 120, 0.5, "finetune's pods")
    node.kill_container(running[-1])
    wait_for(lambda: stage("finetune").get("restarts") == 1, 300, 1, "the failure to count")
    resumed = '"event": "resumed"'
    wait_for(lambda: resumed in attempt_logs(cluster, "finetune", 2), 600, 1, "attempt 2 to resume")

    # Then one of attempt 2's pods is evicted: a disruption, retried without counting.
    pod = wait_for(lambda: running_pods(cluster, "finetune"), 120, 0.5, "attempt 2's pods")[0]
    cluster.core.create_namespaced_pod_eviction(
        pod.metadata.name,
        WATCHED,
        client.V1Eviction(metadata=client.V1ObjectMeta(name=pod.metadata.name, namespace=WATCHED)),
    )
    wait_for(lambda: stage("finetune").get("disruptions") == 1, 300, 1, "the disruption")
    assert stage("finetune")["restarts"] == 1

    wait_for(lambda: status().get("phase") in ("Succeeded", "Failed"), 1200, 2, "the end")
    assert status()["phase"] == "Succeeded", status()
    # The final model, published in the bucket as a diffusers folder.
    assert status()["finalUri"] == f"{store.uri}/final", status()["finalUri"]
    files = store.list("final")
    assert any(key.endswith(".safetensors") for key in files), files
    assert any(key.endswith("config.json") for key in files), files


def pods_of(cluster, stage: str) -> list:
    pods = cluster.core.list_namespaced_pod(WATCHED, label_selector="amber.dev/resource").items
    return sorted(
        (p for p in pods if p.metadata.labels.get("amber.dev/stage") == stage),
        key=lambda p: p.metadata.creation_timestamp,
    )


def running_pods(cluster, stage: str) -> list:
    pods = [
        p
        for p in pods_of(cluster, stage)
        if p.status.phase == "Running" and p.metadata.deletion_timestamp is None
    ]
    return pods if len(pods) == 2 else []


def attempt_logs(cluster, stage: str, attempt: int) -> str:
    """The logs of a stage attempt's pods, together."""
    return "".join(
        cluster.kubectl("logs", "-n", WATCHED, pod.metadata.name, check=False).stdout
        for pod in pods_of(cluster, stage)
        if pod.metadata.labels.get("amber.dev/attempt") == str(attempt)
    )


def test_image_builds_run_steps_whatever_the_cgroup_layout(node, tmp_path):
    """tests/images.sh runs RUN steps in buildah's chroot isolation, which needs neither an
    OCI runtime nor cgroups: on a host whose cgroup v2 hierarchy sits beside v1's with a
    controller in it (crun refuses that layout), a step runs as on any other. The step is a
    static binary in an empty image, run exactly as the script's builds run theirs."""
    import re
    import subprocess
    from pathlib import Path

    script = (Path(__file__).parent / "images.sh").read_text()
    isolation = re.search(r"^export BUILDAH_ISOLATION=(\w+)$", script, re.M)
    assert isolation and isolation.group(1) == "chroot"
    source = tmp_path / "ok.c"
    source.write_text('#include <stdio.h>\nint main(void) { puts("step ran"); return 0; }\n')
    subprocess.run(["gcc", "-static", "-o", tmp_path / "ok", source], check=True)
    buildah = ["buildah", "--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run")]
    env = {"BUILDAH_ISOLATION": isolation.group(1), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    def call(*args) -> str:
        done = subprocess.run([*buildah, *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, (args, done.stderr, cgroup_layout())
        return done.stdout.strip()

    container = call("from", "scratch")
    call("copy", container, str(tmp_path / "ok"), "/ok")
    assert call("run", container, "/ok") == "step ran"
    call("rm", container)


def cgroup_layout() -> str:
    """The host's cgroup mounts and the v2 hierarchy's controllers, for a failure's message."""
    from pathlib import Path

    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if "cgroup" in line]
    unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    controllers = unified.read_text().strip() if unified.exists() else "(no hybrid v2 mount)"
    return "\n".join([*mounts, f"v2 controllers: {controllers}"])
