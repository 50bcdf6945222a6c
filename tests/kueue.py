"""Kueue's own manager (built from its Go module by tests/cluster/build.sh) against the test
control plane: its CRDs and webhooks from the same module, the webhooks reached by URL on
loopback with a certificate from a test CA, and one quota for the tests to share.

Two things differ from an install by Kueue's manifests, both because there is no Service
network here: the webhooks are registered by URL instead of by Service, and the manager,
which reads its metrics certificate from a fixed path (/etc/kueue/metrics/certs) when it does
not manage its own, runs in a mount namespace whose /etc is an overlay, so that the path is
written there and not on the machine.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import yaml
from kubernetes import client

from kube import Cluster, wait_for
from trainer_helpers import free_port

NAMESPACE = "kueue-system"
# The namespaces whose Jobs Kueue manages carry this label: its webhooks ignore the others,
# so the rest of the suite's Jobs never wait on (or fail without) this manager.
MANAGED = "amber.dev/kueue-test"
GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
MANIFESTS = Path(__file__).parent.parent / "manifests" / "scheduling" / "kueue.yaml"


def certificates(folder: Path) -> bytes:
    """A CA and a serving certificate for 127.0.0.1 signed by it (tls.crt, tls.key in
    `folder`); the CA in PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    later = now + datetime.timedelta(days=1)

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("amber-test-ca"))
        .issuer_name(name("amber-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("kueue-webhook"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca.public_bytes(serialization.Encoding.PEM)


def webhooks(manifests: str, port: int, ca: bytes) -> list[dict]:
    """Kueue's webhook configurations for batch/v1 Jobs and its own kinds, by URL."""
    bundle = base64.b64encode(ca).decode()
    out = []
    for doc in yaml.safe_load_all(manifests):
        if not doc:
            continue
        kept = []
        for hook in doc.get("webhooks", []):
            path = hook["clientConfig"]["service"]["path"]
            if "batch-v1-job" not in path and "kueue-x-k8s-io" not in path:
                continue  # integrations not enabled here (Ray, JobSet, Kubeflow, ...)
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}", "caBundle": bundle}
            if "batch-v1-job" in path:
                hook["namespaceSelector"] = {"matchLabels": {MANAGED: "true"}}
            kept.append(hook)
        kind = doc["kind"]
        doc["metadata"] = {"name": f"amber-test-kueue-{kind.lower()}"}
        doc["webhooks"] = kept
        out.append(doc)
    return out


class Kueue:
    """Kueue's manager as a process, configured for batch/v1 Jobs only."""

    def __init__(self, cluster: Cluster, home: str, folder: Path):
        self.cluster, self.home, self.dir = cluster, Path(home), folder
        self.proc = None
        self.hooks: list[dict] = []

    def start(self, timeout: float = 120) -> Kueue:
        self.dir.mkdir(parents=True, exist_ok=True)
        certs = self.dir / "certs"
        ca = certificates(certs)
        webhook_port, health_port = free_port(), free_port()
        crds = sorted((self.home / "config" / "crd").glob("*.yaml"))
        self.cluster.kubectl("apply", "--server-side", *(f"-f={p}" for p in crds))
        for p in crds:
            name = yaml.safe_load(p.read_text())["metadata"]["name"]
            self.cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}")
        self._namespace()
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "manageJobsWithoutQueueName": False,
            "internalCertManagement": {"enable": False},
            "leaderElection": {"leaderElect": False},
            "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(certs)},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
            "metrics": {"bindAddress": "0"},
            "integrations": {"frameworks": ["batch/job"]},
            "featureGates": {"VisibilityOnDemand": False},
        }
        (self.dir / "config.yaml").write_text(yaml.safe_dump(config))
        etc = self.dir / "etc"
        for sub in ("upper", "work"):
            (etc / sub).mkdir(parents=True, exist_ok=True)
        script = " && ".join(
            [
                "mount --make-rprivate /",
                f"mount -t overlay overlay -o lowerdir=/etc,upperdir={etc}/upper,"
                f"workdir={etc}/work /etc",
                "mkdir -p /etc/kueue/metrics",
                f"cp -r {certs} /etc/kueue/metrics/certs",
                f"exec {self.home}/kueue --config={self.dir}/config.yaml --zap-log-level=2",
            ]
        )
        self.log = open(self.dir / "kueue.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "sh", "-c", script],
            env={**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(lambda: self._ready(health_port), timeout, 0.5, "Kueue's manager")
        self.hooks = webhooks(
            (self.home / "config" / "webhooks.yaml").read_text(), webhook_port, ca
        )
        self.cluster.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": self.hooks}),
        )
        return self

    def _namespace(self) -> None:
        try:
            self.cluster.core.create_namespace({"metadata": {"name": NAMESPACE}})
        except client.ApiException as err:
            if err.status != 409:
                raise

    def _ready(self, port: int) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"kueue exited: {(self.dir / 'kueue.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def apply(self, *docs: dict) -> None:
        """Kueue objects (through its webhooks, like any client's)."""
        self.cluster.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}),
        )

    def workloads(self, namespace: str) -> list[dict]:
        return client.CustomObjectsApi(self.cluster.api).list_namespaced_custom_object(
            GROUP, VERSION, namespace, "workloads"
        )["items"]

    def stop(self) -> None:
        for hook in self.hooks:  # failurePolicy Fail: never leave them behind without a server
            kind = "mutatingwebhookconfiguration"
            if hook["kind"].startswith("Validating"):
                kind = "validatingwebhookconfiguration"
            self.cluster.kubectl(
                "delete", kind, hook["metadata"]["name"], "--ignore-not-found", check=False
            )
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc:
            self.log.close()


def queue(name: str, namespace: str, gpus: int) -> list[dict]:
    """manifests/scheduling/kueue.yaml (the documented set-up) for one test: its flavor,
    ClusterQueue and LocalQueue named `name`, `gpus` GPUs of quota, the LocalQueue in
    `namespace`; the priority classes as they are."""
    docs = [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]
    for doc in docs:
        kind = doc["kind"]
        if kind in ("ResourceFlavor", "ClusterQueue", "LocalQueue"):
            doc["metadata"]["name"] = name
        if kind == "LocalQueue":
            doc["metadata"]["namespace"] = namespace
            doc["spec"]["clusterQueue"] = name
        if kind == "ClusterQueue":
            [group] = doc["spec"]["resourceGroups"]
            [flavor] = group["flavors"]
            flavor["name"] = name
            for resource in flavor["resources"]:
                if resource["name"] == "nvidia.com/gpu":
                    resource["nominalQuota"] = str(gpus)
    return docs
