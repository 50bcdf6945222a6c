"""Manifests of one stage attempt, as plain dicts: ConfigMap, headless Service, Indexed Job,
and (gang: volcano) a PodGroup. Pure functions; names and labels are deterministic."""

from __future__ import annotations

from amber import plan
from amber.api import AmberCompression
from amber.plan import StageRun

LABEL_RESOURCE = "amber.dev/resource"
LABEL_STAGE = "amber.dev/stage"
LABEL_ATTEMPT = "amber.dev/attempt"
LABEL_SPEC_HASH = "amber.dev/spec-hash"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
VOLCANO_GROUP = "scheduling.k8s.io/group-name"
CONFIG_MOUNT = "/etc/amber"
RENDEZVOUS_PORT = 29500
# The trainer's only writable paths, besides its volumes: the root filesystem is read-only,
# and torch, Triton, DeepSpeed, Hugging Face and matplotlib keep their caches under $HOME.
SCRATCH = "/tmp"
# What Pod Security's "restricted" level asks of a pod, so that trainers run in a namespace
# that enforces it.
POD_SECURITY = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def labels(obj: AmberCompression, run: StageRun, attempt: int) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "amber",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": "amber-operator",
        LABEL_RESOURCE: obj.metadata.name,
        LABEL_STAGE: run.stage.name,
        LABEL_ATTEMPT: str(attempt),
        LABEL_SPEC_HASH: run.spec_hash,
    }


def config_map(obj: AmberCompression, run: StageRun, attempt: int, name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels(obj, run, attempt)},
        "data": {"stage.json": run.model_dump_json(by_alias=True, indent=2)},
    }


def service(obj: AmberCompression, run: StageRun, attempt: int, name: str) -> dict:
    """Headless: gives pod 0 the stable name `{job}-0.{job}` for the torchrun rendezvous."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels(obj, run, attempt)},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"job-name": name},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}],
        },
    }


def torchrun_args(run: StageRun, name: str) -> list[str]:
    pods = run.resources.pods
    per_pod = max(1, run.resources.gpus_per_pod)
    rendezvous = (
        # One pod needs no rendezvous host; several meet at pod 0's stable hostname.
        ["--standalone"]
        if pods == 1
        else [
            f"--nnodes={pods}",
            "--node-rank=$(JOB_COMPLETION_INDEX)",
            f"--master-addr={name}-0.{name}",
            f"--master-port={RENDEZVOUS_PORT}",
        ]
    )
    return plan.torchrun_args(run.stage.type, f"{CONFIG_MOUNT}/stage.json", per_pod, rendezvous)


def environment(obj: AmberCompression, run: StageRun) -> list[dict]:
    storage = obj.spec.storage
    env = [
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {
                "fieldRef": {
                    "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                }
            },
        },
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HOME", "value": SCRATCH},
    ]
    env += [
        {"name": k, "value": v} for k, v in plan.accelerator_env(run.resources.gpus_per_pod).items()
    ]
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": storage.region})
    secret = storage.credentials_secret
    if secret:
        for var, key in (
            ("AWS_ACCESS_KEY_ID", secret.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", secret.secret_access_key_key),
        ):
            env.append(
                {"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}}
            )
    return env


def job(
    obj: AmberCompression, run: StageRun, attempt: int, name: str, service_account: str = ""
) -> dict:
    spec = obj.spec
    res = run.resources
    gang = spec.scheduling.gang
    meta_labels = labels(obj, run, attempt)
    if gang == "kueue":
        meta_labels[KUEUE_QUEUE] = spec.scheduling.queue_name
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if res.gpus_per_pod:
        limits["nvidia.com/gpu"] = str(res.gpus_per_pod)
    if res.cpu:
        requests["cpu"] = limits["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = res.memory
    pod_meta = {"labels": meta_labels}
    if gang == "volcano":
        pod_meta["annotations"] = {VOLCANO_GROUP: name}
    pod_spec: dict = {
        "restartPolicy": "Never",
        "subdomain": name,
        # Trainers read storage, never the Kubernetes API: no token in their pods.
        "automountServiceAccountToken": False,
        "securityContext": POD_SECURITY,
        "containers": [
            {
                "name": "trainer",
                "image": spec.image,
                "command": ["torchrun"],
                "args": torchrun_args(run, name),
                "env": environment(obj, run),
                "resources": {"limits": limits, "requests": requests},
                "ports": [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}],
                "securityContext": CONTAINER_SECURITY,
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "scratch", "mountPath": SCRATCH},
                ],
                "terminationMessagePolicy": "File",
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": name}},
            # NCCL and DataLoader workers need more shared memory than the default 64Mi.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            # Downloads (the teacher, the student), checkpoints before upload, caches.
            {"name": "scratch", "emptyDir": {}},
        ],
    }
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.dump() for t in res.tolerations]
    if spec.scheduling.priority_class_name:
        pod_spec["priorityClassName"] = spec.scheduling.priority_class_name
    if gang == "volcano":
        pod_spec["schedulerName"] = "volcano"
    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": meta_labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": res.pods,
            "parallelism": res.pods,
            # A gang fails as a whole; the operator decides about retries.
            "backoffLimit": 0,
            "podFailurePolicy": {
                "rules": [
                    # Rule 0 marks preemption and node loss, which do not count as failures.
                    {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget"}]},
                    {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [0]}},
                ]
            },
            "template": {"metadata": pod_meta, "spec": pod_spec},
        },
    }
    if gang == "kueue":
        body["spec"]["suspend"] = True  # Kueue admits the whole gang by unsuspending it
    return body


def pod_group(obj: AmberCompression, run: StageRun, attempt: int, name: str) -> dict:
    """Volcano's all-or-nothing unit: `minMember` pods or none."""
    spec: dict = {"minMember": run.resources.pods}
    if obj.spec.scheduling.queue_name:
        spec["queue"] = obj.spec.scheduling.queue_name
    if obj.spec.scheduling.priority_class_name:
        spec["priorityClassName"] = obj.spec.scheduling.priority_class_name
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": {"name": name, "labels": labels(obj, run, attempt)},
        "spec": spec,
    }


def children(
    obj: AmberCompression, run: StageRun, attempt: int, name: str, service_account: str = ""
) -> list[dict]:
    """Everything one attempt needs, in creation order."""
    out = [config_map(obj, run, attempt, name), service(obj, run, attempt, name)]
    if obj.spec.scheduling.gang == "volcano":
        out.append(pod_group(obj, run, attempt, name))
    out.append(job(obj, run, attempt, name, service_account))
    return out
