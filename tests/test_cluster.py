"""The test control plane is real: admission, controllers, scheduling and garbage collection."""

from __future__ import annotations

import json

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from amber.schema import crd
from kube import NODE, wait_for

pytestmark = pytest.mark.e2e


def test_fake_node_is_ready_with_gpus(cluster):
    node = cluster.core.read_node(NODE)
    assert node.status.allocatable["nvidia.com/gpu"] == "8"
    assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)


def test_crd_schema_rejects_bad_objects_naming_the_field(cluster, tmp_path):
    manifest = tmp_path / "crd.yaml"
    manifest.write_text(yaml.safe_dump(crd()))
    cluster.kubectl("apply", "-f", str(manifest))
    ext = client.ApiextensionsV1Api(cluster.api)

    def established():
        found = ext.read_custom_resource_definition("ambercompressions.amber.dev")
        return any(
            c.type == "Established" and c.status == "True" for c in found.status.conditions or []
        )

    wait_for(established, 30, what="the CRD to be established")
    good = {
        "apiVersion": "amber.dev/v1alpha1",
        "kind": "AmberCompression",
        "metadata": {"name": "smoke"},
        "spec": {
            "teacher": {"config": {"num_layers": 12}, "numLayers": 12},
            "data": {"synthetic": {}},
            "storage": {"uri": "s3://bucket/runs"},
            "preset": "amber-6b",
        },
    }
    cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(good))
    # A field two stage types share with different values (score's mode and distill's).
    stages = [
        {"type": "score", "targetLayers": 6, "mode": "iterative", "selection": "top"},
        {"type": "prune"},
        {"type": "distill", "mode": "local"},
    ]
    explicit = {**good, "spec": {**good["spec"], "stages": stages}}
    del explicit["spec"]["preset"]
    cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(explicit))
    cases = [
        ({"resources": {"gpusPerPod": -1}}, "spec.resources.gpusPerPod"),
        ({"stages": [{"type": "prune"}]}, "exactly one of spec.preset and spec.stages"),
        (
            {"storage": {"uri": "s3://b", "accessKey": "inline"}},
            'unknown field "spec.storage.accessKey"',
        ),
        ({"scheduling": {"gang": "kueue"}}, "queueName is required when gang is kueue"),
        (
            {"preset": None, "stages": [{"type": "prune", "targetLayers": 3}]},
            "targetLayers only applies to stage types: score",
        ),
        (
            {"preset": None, "stages": [*stages[:2], {"type": "distill", "mode": "iterative"}]},
            "mode of a distill stage is one of: local, global",
        ),
    ]
    for change, message in cases:
        bad = json.loads(json.dumps(good))
        bad["spec"].update(change)
        bad["spec"] = {k: v for k, v in bad["spec"].items() if v is not None}
        out = cluster.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
        assert out.returncode != 0, change
        assert message in out.stderr, out.stderr


def test_a_job_completes_through_the_controllers(cluster):
    batch = client.BatchV1Api(cluster.api)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "hello"},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "python:3.11",
                            "command": ["python", "-c"],
                            "args": ["import os; print('index', os.environ['INDEX'])"],
                            "env": [
                                {
                                    "name": "INDEX",
                                    "valueFrom": {
                                        "fieldRef": {
                                            "fieldPath": "metadata.annotations"
                                            "['batch.kubernetes.io/job-completion-index']"
                                        }
                                    },
                                }
                            ],
                        }
                    ],
                }
            },
        },
    }
    batch.create_namespaced_job("default", job)

    def complete():
        status = batch.read_namespaced_job_status("hello", "default").status
        return status.succeeded == 2 and any(
            c.type == "Complete" and c.status == "True" for c in status.conditions or []
        )

    wait_for(complete, 90, what="the Job to complete")
    pods = cluster.core.list_namespaced_pod("default", label_selector="job-name=hello").items
    assert sorted(p.status.phase for p in pods) == ["Succeeded", "Succeeded"]
    assert all(p.spec.node_name == NODE for p in pods)  # bound by the real scheduler


def test_deleting_an_owner_garbage_collects_its_children(cluster):
    owner = cluster.core.create_namespaced_config_map(
        "default", {"metadata": {"name": "owner"}, "data": {"a": "1"}}
    )
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
    }
    cluster.core.create_namespaced_config_map(
        "default", {"metadata": {"name": "child", "ownerReferences": [reference]}}
    )
    cluster.core.delete_namespaced_config_map("owner", "default")

    def child_gone():
        try:
            cluster.core.read_namespaced_config_map("child", "default")
            return False
        except ApiException as err:
            return err.status == 404

    wait_for(child_gone, 60, what="the garbage collector")


def test_trainer_pods_are_admitted_where_pod_security_is_restricted(cluster, tmp_path):
    """Trainer pods meet Pod Security's "restricted" level (non-root, no privilege
    escalation, no capabilities, the runtime's seccomp profile), so a namespace that enforces
    it admits them; the same pod without its security context is refused."""
    from amber.plan import plan
    from amber.resource import parse
    from amber_operator import render
    from trainer_helpers import tiny_resource

    namespace = "restricted-trainers"
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    cluster.core.create_namespace({"metadata": {"name": namespace, "labels": labels}})
    doc = tiny_resource(str(tmp_path), name="rs")
    doc["spec"]["resources"] = {"pods": 2, "gpusPerPod": 0}
    obj = parse(doc)
    job = render.job(obj, plan(obj)[0], 1, "rs-score-abcde-1")
    spec = job["spec"]["template"]["spec"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "rs-0"}, "spec": spec}

    def admitted(body: dict):
        return cluster.kubectl(
            "create", "-n", namespace, "--dry-run=server", "-f", "-",
            input=json.dumps(body), check=False,
        )  # fmt: skip

    assert admitted(pod).returncode == 0, admitted(pod).stderr
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["HOME"] == render.SCRATCH and env["DS_ACCELERATOR"] == "cpu"
    bare = json.loads(json.dumps(pod))
    del bare["spec"]["securityContext"], bare["spec"]["containers"][0]["securityContext"]
    refused = admitted(bare)
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused.stderr
    cluster.core.delete_namespace(namespace)
