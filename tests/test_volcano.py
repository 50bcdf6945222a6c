"""What Amber renders for Volcano against Volcano's own schemas (generated from its
API types by tests/cluster/build.sh; Volcano's scheduler cannot be built here:
docs/testing.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubernetes import client

from amber.plan import plan
from amber.resource import parse
from amber_operator import render
from trainer_helpers import tiny_resource

pytestmark = [pytest.mark.e2e]
GROUP, VERSION, PLURAL = "scheduling.volcano.sh", "v1beta1", "podgroups"
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def podgroups(cluster):
    """Volcano's CRDs in the test control plane; a client for its objects."""
    for path in sorted(Path(cluster.binaries["volcano_crds"]).glob("*.yaml")):
        cluster.kubectl("apply", "-f", str(path))
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}")
    return client.CustomObjectsApi(cluster.api)


def test_the_documented_queue_is_one_volcano_accepts(cluster, podgroups):
    path = ROOT / "manifests" / "scheduling" / "volcano.yaml"
    cluster.kubectl("apply", "--validate=strict", "-f", str(path))
    queue = podgroups.get_cluster_custom_object(GROUP, VERSION, "queues", "amber")
    assert queue["spec"]["capability"] == {"nvidia.com/gpu": "64"}


def test_the_rendered_pod_group_is_one_volcano_accepts(cluster, podgroups, tmp_path):
    doc = tiny_resource(str(tmp_path), name="vc")
    doc["spec"]["resources"] = {"pods": 3, "gpusPerPod": 1}
    doc["spec"]["scheduling"] = {
        "gang": "volcano",
        "queueName": "amber",
        "priorityClassName": "amber-high",
    }
    obj = parse(doc)
    run = plan(obj)[0]
    name = "vc-score-abcde-1"
    group, job = render.children(obj, run, 1, name)[-2:]
    assert group["kind"] == "PodGroup" and job["kind"] == "Job"
    pod = job["spec"]["template"]
    assert pod["spec"]["schedulerName"] == "volcano"
    assert pod["metadata"]["annotations"][render.VOLCANO_GROUP] == group["metadata"]["name"]

    # Strict: a field Volcano's schema does not know is an error, not silently dropped.
    namespace = "default"
    made = podgroups.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, group, field_validation="Strict"
    )
    assert made["spec"] == {"minMember": 3, "queue": "amber", "priorityClassName": "amber-high"}
    podgroups.delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, made["metadata"]["name"]
    )

    wrong = {**group, "spec": {**group["spec"], "minMembers": 3}}
    with pytest.raises(client.ApiException) as err:
        podgroups.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, wrong, field_validation="Strict"
        )
    assert err.value.status == 400 and "minMembers" in err.value.body
