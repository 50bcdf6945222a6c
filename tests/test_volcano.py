"""What Amber renders for Volcano against Volcano's own PodGroup schema (generated from its
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


@pytest.fixture(scope="module")
def podgroups(cluster, tmp_path_factory):
    path = cluster.binaries["podgroup_crd"]
    cluster.kubectl("apply", "-f", path)
    name = yaml.safe_load(Path(path).read_text())["metadata"]["name"]
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}")
    return client.CustomObjectsApi(cluster.api)


def test_the_rendered_pod_group_is_one_volcano_accepts(cluster, podgroups, tmp_path):
    doc = tiny_resource(str(tmp_path), name="vc")
    doc["spec"]["resources"] = {"pods": 3, "gpusPerPod": 1}
    doc["spec"]["scheduling"] = {
        "gang": "volcano",
        "queueName": "research",
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
    assert made["spec"] == {"minMember": 3, "queue": "research", "priorityClassName": "amber-high"}
    podgroups.delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, made["metadata"]["name"]
    )

    wrong = {**group, "spec": {**group["spec"], "minMembers": 3}}
    with pytest.raises(client.ApiException) as err:
        podgroups.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, wrong, field_validation="Strict"
        )
    assert err.value.status == 400 and "minMembers" in err.value.body
