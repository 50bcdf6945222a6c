"""A real Kubernetes control plane for tests, and a pod runner standing in for the kubelet.

`Cluster.start()` builds (or reuses) `tests/cluster`'s binary, starts etcd, kube-apiserver,
kube-controller-manager and kube-scheduler on loopback, and registers a Ready fake node with
CPU, memory and `nvidia.com/gpu` capacity. There is no container runtime here, so
`PodRunner` plays the kubelet for pods bound to that node: it runs the container's command
and args as a local process with the pod's environment (downward API, Secret and ConfigMap
references resolved), maps ConfigMap volumes to local folders, and writes the exit code and
termination message back into the pod status. Jobs therefore really progress through the
controller-manager. This runner is the one mock in the Kubernetes tests, and only because no
container runtime can exist on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import urllib3
import yaml
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from trainer_helpers import free_port, kill_tree

HERE = Path(__file__).parent
# The control plane serves a self-signed certificate on loopback.
urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
NODE = "amber-fake-node"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def build() -> dict[str, str]:
    """Paths of the cached binaries (built on first use)."""
    out = subprocess.run(
        ["bash", str(HERE / "cluster" / "build.sh")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.split())


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    """Poll until `predicate()` is truthy; its value. Bounded, with a message when it is not."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Cluster:
    dir: Path
    binary: str
    proc: subprocess.Popen | None = None
    kubeconfig: Path = field(init=False)
    runner: PodRunner | None = None
    # `up`'s extra flags, and what it runs under (tests/node.py: a network namespace).
    args: tuple[str, ...] = ()
    prefix: tuple[str, ...] = ()
    # The fake GPU node and its pod runner; a cluster with a real node has neither.
    fake_node: bool = True

    def __post_init__(self):
        self.kubeconfig = self.dir / "kubeconfig"

    def start(self, timeout: float = 180) -> Cluster:
        self.log = open(self.dir / "testcluster.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*self.prefix, self.binary, "up", "--dir", str(self.dir), *self.args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        ready = self.dir / "ready"
        wait_for(
            lambda: ready.exists() or self.proc.poll() is not None,
            timeout,
            what="the control plane",
        )
        if not ready.exists():
            raise RuntimeError(f"testcluster exited: {(self.dir / 'testcluster.log').read_text()}")
        self.api = config.new_client_from_config(str(self.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        if self.fake_node:
            self.register_node()
        wait_for(self._default_service_account, 60, what="the default service account")
        if self.fake_node:
            self.runner = PodRunner(self)
            self.runner.start()
        return self

    def _default_service_account(self) -> bool:
        try:
            self.core.read_namespaced_service_account("default", "default")
            return True
        except ApiException:
            return False

    def register_node(self) -> None:
        capacity = {"cpu": "64", "memory": "512Gi", "pods": "220", "nvidia.com/gpu": "8"}
        node = client.V1Node(
            metadata=client.V1ObjectMeta(
                name=NODE, labels={"kubernetes.io/hostname": NODE, "amber.dev/fake": "true"}
            ),
            status=client.V1NodeStatus(capacity=capacity, allocatable=capacity),
        )
        self.core.create_node(node)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "amber test pod runner",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
        self.core.patch_node_status(NODE, {"status": {"conditions": [ready]}})
        # Admission taints a new node not-ready; the node lifecycle controller (not run here)
        # would lift that once the node reports Ready. Do its job.
        self.core.patch_node(NODE, {"spec": {"taints": []}})

    def kubectl(self, *args: str, input: str | None = None, check: bool = True):
        proc = subprocess.run(
            ["kubectl", f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode:  # what kubectl said is what a failing test needs
            raise AssertionError(f"kubectl {' '.join(args)}: exit {proc.returncode}: {proc.stderr}")
        return proc

    def stop(self) -> None:
        if self.runner:
            self.runner.stop()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


class PodRunner:
    """Runs pods bound to the fake node as local processes and reports their status."""

    def __init__(self, cluster: Cluster):
        self.core = client.CoreV1Api(config.new_client_from_config(str(cluster.kubeconfig)))
        self.kubeconfig = cluster.kubeconfig
        self.work = Path(tempfile.mkdtemp(prefix="amber-pods-"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.pods: dict[str, object] = {}  # every pod this runner started, by ns/name
        self.disrupted: set[str] = set()  # pods to report with a DisruptionTarget condition
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.extra_env: dict[str, str] = {}

    def start(self) -> None:
        thread = threading.Thread(target=self._watch, name="pod-runner", daemon=True)
        thread.start()
        self.threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            for proc in self.procs.values():
                _kill(proc)
        shutil.rmtree(self.work, ignore_errors=True)

    def kill_pods(self, predicate) -> int:
        """SIGKILL the processes of running pods matching `predicate(pod)` (a crash)."""
        with self.lock:
            victims = [
                proc
                for key, proc in self.procs.items()
                if proc is not None and predicate(self.pods[key])
            ]
        for proc in victims:
            _kill(proc)
        return len(victims)

    def disrupt_pods(self, predicate) -> int:
        """Fail matching running pods as a preemption or node loss would (DisruptionTarget)."""
        with self.lock:
            keys = [k for k, p in self.procs.items() if p is not None and predicate(self.pods[k])]
            self.disrupted.update(keys)
        return self.kill_pods(lambda pod: f"{pod.metadata.namespace}/{pod.metadata.name}" in keys)

    def running(self) -> list[str]:
        """Pods whose processes are alive."""
        with self.lock:
            return [k for k, p in self.procs.items() if p is not None and p.poll() is None]

    def logs(self, predicate) -> str:
        """Output of the pods matching `predicate(pod)`, concatenated."""
        texts = []
        for key, pod in list(self.pods.items()):
            path = self.work / key.replace("/", "_") / "log.txt"
            if predicate(pod) and path.exists():
                texts.append(path.read_text())
        return "\n".join(texts)

    def _watch(self) -> None:
        while not self.stopping.is_set():
            try:
                stream = watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    field_selector=f"spec.nodeName={NODE}",
                    timeout_seconds=5,
                )
                for event in stream:
                    if self.stopping.is_set():
                        return
                    self._handle(event["type"], event["object"])
            except Exception as err:  # the watch is restarted; errors are shown, not lost
                if not self.stopping.is_set():
                    print(f"pod runner: {err!r}", file=sys.stderr)
                    time.sleep(0.5)

    def _handle(self, kind: str, pod) -> None:
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        if pod.metadata.deletion_timestamp is not None:
            with self.lock:
                proc = self.procs.pop(key, None)
            if proc:
                _kill(proc)
            # No kubelet will confirm the deletion: finish it as the kubelet would.
            with contextlib.suppress(ApiException):
                self.core.delete_namespaced_pod(
                    pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0
                )
            return
        if kind == "DELETED" or pod.status.phase not in (None, "Pending"):
            return
        with self.lock:
            if key in self.procs:
                return
            self.procs[key] = None  # claimed
            self.pods[key] = pod
        thread = threading.Thread(target=self._run, args=(pod, key), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _identity(self, pod, root: Path) -> dict[str, str]:
        """The pod's ServiceAccount, as a kubelet would give it: a bound token (TokenRequest),
        here in a kubeconfig (clients fall back to KUBECONFIG outside a real pod). None when
        the pod opts out of the token."""
        if pod.spec.automount_service_account_token is False:
            return {}
        account = pod.spec.service_account_name or "default"
        request = {
            "spec": {
                "expirationSeconds": 3600,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod.metadata.name,
                    "uid": pod.metadata.uid,
                },
            }
        }
        token = self.core.create_namespaced_service_account_token(
            account, pod.metadata.namespace, request
        ).status.token
        admin = yaml.safe_load(self.kubeconfig.read_text())
        server = admin["clusters"][0]["cluster"]
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cluster", "cluster": server}],
            "users": [{"name": account, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "pod",
                    "context": {
                        "cluster": "cluster",
                        "user": account,
                        "namespace": pod.metadata.namespace,
                    },
                }
            ],
            "current-context": "pod",
        }
        path = root / "serviceaccount.kubeconfig"
        path.write_text(yaml.safe_dump(doc))
        return {"KUBECONFIG": str(path)}

    def _env(self, pod, container, volumes: dict[str, Path], root: Path) -> dict[str, str]:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
            **self._identity(pod, root),
        }
        for source in container.env_from or []:
            if source.secret_ref:
                secret = self.core.read_namespaced_secret(
                    source.secret_ref.name, pod.metadata.namespace
                )
                env.update(_decode(secret.data))
            if source.config_map_ref:
                cm = self.core.read_namespaced_config_map(
                    source.config_map_ref.name, pod.metadata.namespace
                )
                env.update(cm.data or {})
        for var in container.env or []:
            env[var.name] = self._value(pod, var)
        return env

    def _value(self, pod, var) -> str:
        if var.value_from is None:
            return var.value or ""
        source = var.value_from
        if source.field_ref:
            path = source.field_ref.field_path
            meta = pod.metadata
            if path == "metadata.name":
                return meta.name
            if path == "metadata.namespace":
                return meta.namespace
            if path == "status.podIP":
                return "127.0.0.1"
            for prefix, mapping in (
                ("metadata.annotations", meta.annotations),
                ("metadata.labels", meta.labels),
            ):
                if path.startswith(prefix + "["):
                    return (mapping or {}).get(path[len(prefix) + 2 : -2], "")
            raise ValueError(f"unsupported fieldRef {path}")
        if source.secret_key_ref:
            ref = source.secret_key_ref
            secret = self.core.read_namespaced_secret(ref.name, pod.metadata.namespace)
            return _decode(secret.data)[ref.key]
        if source.config_map_key_ref:
            ref = source.config_map_key_ref
            cm = self.core.read_namespaced_config_map(ref.name, pod.metadata.namespace)
            return cm.data[ref.key]
        raise ValueError(f"unsupported valueFrom for {var.name}")

    def _volumes(self, pod, root: Path) -> dict[str, Path]:
        """ConfigMap and emptyDir volumes as local folders, by volume name."""
        folders = {}
        for volume in pod.spec.volumes or []:
            folder = root / "volumes" / volume.name
            folder.mkdir(parents=True, exist_ok=True)
            if volume.config_map:
                cm = self.core.read_namespaced_config_map(
                    volume.config_map.name, pod.metadata.namespace
                )
                for name, text in (cm.data or {}).items():
                    (folder / name).write_text(text)
            folders[volume.name] = folder
        return folders

    def _run(self, pod, key: str) -> None:
        container = pod.spec.containers[0]
        root = self.work / key.replace("/", "_")
        root.mkdir(parents=True, exist_ok=True)
        try:
            volumes = self._volumes(pod, root)
            env = self._env(pod, container, volumes, root)
        except Exception as err:  # report a pod that cannot start as Failed, like a kubelet
            self._finish(pod, 128, "CreateContainerConfigError", str(err))
            return
        # Paths under volume mounts point at the local folders instead.
        mounts = {m.mount_path: volumes[m.name] for m in container.volume_mounts or []}
        termination = root / "termination-log"
        env["AMBER_TERMINATION_LOG"] = str(termination)

        # One pass, longest mount first, a path only where an argument or a flag's value
        # starts: a folder that replaced one mount's path (under /tmp) is not itself a
        # path under another mount (the trainer's scratch volume is /tmp).
        prefixes = {m.rstrip("/") + "/": f"{folder}/" for m, folder in mounts.items()}
        pattern = "|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True))

        def local(arg: str) -> str:
            if not pattern:
                return arg
            return re.sub(f"(^|=)({pattern})", lambda m: m.group(1) + prefixes[m.group(2)], arg)

        def expand(arg: str) -> str:
            # $(VAR) from the container's environment, as the kubelet expands it; and no
            # cluster DNS here: every pod of a gang is on this machine, so pod 0's stable
            # hostname (torchrun's rendezvous host) is this machine's loopback address.
            arg = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)
            return re.sub(r"^--master-addr=.*$", "--master-addr=127.0.0.1", arg)

        command = [*(container.command or []), *(container.args or [])]
        argv = [local(expand(a)) for a in command]
        if argv and argv[0] in ("python", "python3"):
            argv[0] = sys.executable  # the interpreter the tests run under
        self._status(pod, "Running")
        log = open(root / "log.txt", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with self.lock:
            if key not in self.procs:  # deleted while starting
                _kill(proc)
                return
            self.procs[key] = proc
        code = proc.wait()
        log.close()
        with self.lock:
            still_ours = self.procs.pop(key, None) is proc
        if still_ours and not self.stopping.is_set():
            message = termination.read_text() if termination.exists() else ""
            code = 128 - code if code < 0 else code  # killed by signal N: exit 128+N
            disrupted = key in self.disrupted
            self._finish(pod, code, "Completed" if code == 0 else "Error", message, disrupted)

    def _status(self, pod, phase: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        container = pod.spec.containers[0]
        status = {
            "phase": phase,
            "podIP": "127.0.0.1",
            "startTime": now,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
            "containerStatuses": [
                {
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": True,
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": now}},
                }
            ],
        }
        with contextlib.suppress(ApiException):
            self.core.patch_namespaced_pod_status(
                pod.metadata.name, pod.metadata.namespace, {"status": status}
            )

    def _finish(self, pod, code: int, reason: str, message: str, disrupted=False) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        container = pod.spec.containers[0]
        conditions = [{"type": "Ready", "status": "False", "lastTransitionTime": now}]
        if disrupted:
            conditions.append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "PreemptionByScheduler",
                    "message": "preempted (test pod runner)",
                    "lastTransitionTime": now,
                }
            )
        status = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": conditions,
            "containerStatuses": [
                {
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": code,
                            "reason": reason,
                            "message": message[-4096:],
                            "finishedAt": now,
                        }
                    },
                }
            ],
        }
        with contextlib.suppress(ApiException):
            self.core.patch_namespaced_pod_status(
                pod.metadata.name, pod.metadata.namespace, {"status": status}
            )


def _decode(data: dict | None) -> dict[str, str]:
    import base64

    return {k: base64.b64decode(v).decode() for k, v in (data or {}).items()}


def _kill(proc: subprocess.Popen | None) -> None:
    """End a pod's process and everything it started (torchrun workers included)."""
    if proc is not None and proc.poll() is None:
        kill_tree(proc)


def dump(obj) -> str:
    return json.dumps(client.ApiClient().sanitize_for_serialization(obj), indent=2)


# --- the operator against this cluster ----------------------------------------------------

GROUP, VERSION, PLURAL = "amber.dev", "v1alpha1", "ambercompressions"


class Operator:
    """`amber operator` as a separate process, as its Deployment would run it."""

    def __init__(self, cluster, namespace, log_path, interval=1, peering: list[str] = ()):
        self.cluster, self.namespace, self.log_path = cluster, namespace, log_path
        self.interval, self.peering = interval, list(peering)
        self.metrics_port = free_port()
        self.proc = None

    def start(self):
        env = {
            **os.environ,
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "AMBER_RECONCILE_INTERVAL": str(self.interval),
            "PYTHONUNBUFFERED": "1",
        }
        self.log = open(self.log_path, "a")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "amber",
                "operator",
                "-n",
                self.namespace,
                "--liveness-port",
                str(free_port()),
                "--metrics-port",
                str(self.metrics_port),
                *self.peering,
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def metrics(self) -> str:
        """What the operator's Prometheus endpoint serves now."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            return r.read().decode()

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)
        if self.proc:  # started: its log is open
            self.log.close()


def get(cluster, namespace, name):
    return client.CustomObjectsApi(cluster.api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )


def phase_is(cluster, namespace, name, phase):
    return lambda: (get(cluster, namespace, name).get("status") or {}).get("phase") == phase


def apply(cluster, namespace, doc):
    doc = {**doc, "metadata": {**doc["metadata"], "namespace": namespace}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))


def jobs_of(cluster, namespace, stage=None):
    selector = "amber.dev/resource" + (f",amber.dev/stage={stage}" if stage else "")
    return (
        client.BatchV1Api(cluster.api).list_namespaced_job(namespace, label_selector=selector).items
    )
