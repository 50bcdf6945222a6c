"""Shared fixtures: a real S3 endpoint on loopback, tiny models, a clean environment."""

from __future__ import annotations

import os
import threading
import uuid
import zlib

import pytest


def pytest_configure(config):
    # `./tests/run` runs one xdist worker per core: one thread each, set before any test
    # module imports torch, keeps the workers from oversubscribing the cores.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def pytest_terminal_summary(terminalreporter):
    # The real-node test builds the images of images/ and records their sizes (any worker's
    # report reaches this controller with its properties).
    for reports in terminalreporter.stats.values():
        for report in reports:
            for name, value in getattr(report, "user_properties", ()):
                if name == "image sizes" and getattr(report, "when", "") == "call":
                    terminalreporter.write_sep("-", f"images: {value}")


@pytest.fixture(scope="session", autouse=True)
def _temp_folder(tmp_path_factory):
    # Tests kill trainers and `amber run` on purpose, and a killed process leaves its work
    # folder: under pytest's base folder (pytest keeps the last three) rather than in /tmp.
    import tempfile

    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto in server mode, in its own process, reached over HTTP like any S3 service."""
    from trainer_helpers import moto_server

    proc, url = moto_server()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Environment that points boto3 at the loopback endpoint with test credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "amber-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "amber-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AMBER_S3_SECRET_DIR", raising=False)
    return s3_endpoint


@pytest.fixture
def bucket(s3_env):
    """A fresh bucket per test: s3://<name>."""
    import boto3

    name = f"amber-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A real control plane on loopback with a fake GPU node and the test pod runner."""
    from kube import Cluster, build

    binaries = build()
    running = Cluster(tmp_path_factory.mktemp("cluster"), binaries["testcluster"]).start()
    running.binaries = binaries
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Two cores: keep torch from oversubscribing them when tests run model code.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))


@pytest.fixture(scope="session")
def crd_installed(cluster, tmp_path_factory):
    import yaml

    from amber.schema import crd

    path = tmp_path_factory.mktemp("crd") / "crd.yaml"
    path.write_text(yaml.safe_dump(crd()))
    cluster.kubectl("apply", "-f", str(path))
    cluster.kubectl("wait", "--for=condition=Established", "crd/ambercompressions.amber.dev")
    cluster.runner.extra_env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    return True


@pytest.fixture
def namespace(cluster, crd_installed, request):
    digest = zlib.crc32(f"{request.node.nodeid}{os.getpid()}".encode()) % 100_000
    name = f"e2e-{request.node.name.split('_')[1][:10]}-{digest}".lower()
    cluster.core.create_namespace({"metadata": {"name": name}})
    yield name
    # The test's operator has stopped by now (its fixture ends first), so nothing will remove
    # kopf's finalizer from the resources left: lift it, so that the namespace goes with its
    # Jobs and trainer processes, and a later test that deletes the CRD does not wait on them.
    from kubernetes import client

    from kube import GROUP, PLURAL, VERSION

    objects = client.CustomObjectsApi(cluster.api)
    for item in objects.list_namespaced_custom_object(GROUP, VERSION, name, PLURAL)["items"]:
        objects.patch_namespaced_custom_object(
            GROUP, VERSION, name, PLURAL, item["metadata"]["name"], {"metadata": {"finalizers": []}}
        )
    cluster.core.delete_namespace(name)


@pytest.fixture
def operator(cluster, namespace, tmp_path):
    """`amber operator` as its own process, watching the test's namespace."""
    from kube import Operator

    op = Operator(cluster, namespace, tmp_path / "operator.log").start()
    yield op
    op.kill()


@pytest.fixture
def cutting(s3_endpoint, bucket):
    """`start(n, damage)`: a proxy whose first `n` GET bodies are cut off (or, with
    damage="flip", have one byte changed); point AWS_ENDPOINT_URL at its `url`."""
    proxies = []

    def start(cuts: int, damage: str = "cut"):
        from s3_proxy import CuttingProxy

        proxy = CuttingProxy(s3_endpoint, cuts, damage)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.shutdown()
        proxy.server_close()
