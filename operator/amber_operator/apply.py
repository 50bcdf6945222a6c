"""Carrying out a Decision's actions against the API server, idempotently.

Creates are create-if-absent with deterministic names (a 409 means an earlier pass or an
earlier operator process already did it); deletes tolerate 404. Every child is owned by the
AmberCompression, so deleting the resource garbage-collects all of them.
"""

from __future__ import annotations

from kubernetes import client
from kubernetes.client.rest import ApiException

from amber import report
from amber.api import AmberCompression
from amber.plan import StageRun
from amber.publish import publish_final
from amber_operator import render
from amber_operator.reconcile import CreateAttempt, DeleteJob, PublishFinal


def owner_reference(body: dict) -> dict:
    meta = body["metadata"]
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _creator(api: client.ApiClient, kind: str):
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    if kind == "ConfigMap":
        return lambda ns, body: core.create_namespaced_config_map(ns, body)
    if kind == "Service":
        return lambda ns, body: core.create_namespaced_service(ns, body)
    if kind == "Job":
        return lambda ns, body: batch.create_namespaced_job(ns, body)
    if kind == "PodGroup":
        custom = client.CustomObjectsApi(api)
        return lambda ns, body: custom.create_namespaced_custom_object(
            "scheduling.volcano.sh", "v1beta1", ns, "podgroups", body
        )
    raise ValueError(f"no creator for {kind}")


def create(api: client.ApiClient, namespace: str, manifest: dict, owner: dict) -> bool:
    """Create unless it exists; True when this call created it."""
    manifest["metadata"]["ownerReferences"] = [owner]
    manifest["metadata"]["namespace"] = namespace
    try:
        _creator(api, manifest["kind"])(namespace, manifest)
        return True
    except ApiException as err:
        if err.status == 409:
            return False
        raise


def delete_job(api: client.ApiClient, namespace: str, name: str) -> None:
    try:
        client.BatchV1Api(api).delete_namespaced_job(
            name, namespace, propagation_policy="Background"
        )
    except ApiException as err:
        if err.status != 404:
            raise


def apply(
    api,
    obj: AmberCompression,
    runs: list[StageRun],
    body: dict,
    actions: list,
    store_factory,
    service_account="",
) -> None:
    ns = obj.metadata.namespace
    owner = owner_reference(body)
    for action in actions:
        if isinstance(action, CreateAttempt):
            children = render.children(obj, action.run, action.attempt, action.job, service_account)
            for manifest in children:
                create(api, ns, manifest, owner)
        elif isinstance(action, DeleteJob):
            delete_job(api, ns, action.name)
        elif isinstance(action, PublishFinal):
            store = store_factory()
            publish_final(obj, runs, store)
            report.write(obj, runs, store, list(action.stages))
