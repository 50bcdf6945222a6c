"""Operator at scale: N resources applied at once against the test control plane.

    python bench/operator_scale.py [--resources 100]

Starts the control plane from tests/cluster (no pod runner: only the operator's reaction is
measured), the operator as its own process, then applies N tiny AmberCompressions in one
`kubectl apply`. Prints the time from apply to each resource's first Job (median, p99, max),
API requests per resource (from the apiserver's own `apiserver_request_total`), and the
operator's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests
import yaml

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from kubernetes import client, watch

from amber.schema import crd
from kube import Cluster, build, wait_for
from trainer_helpers import free_port, tiny_resource


def api_requests(cluster: Cluster) -> float:
    """Total requests the apiserver has served (all verbs and resources)."""
    info = json.loads((cluster.dir / "ready").read_text())
    text = requests.get(
        f"{info['server']}/metrics",
        headers={"Authorization": f"Bearer {info['token']}"},
        verify=False,
        timeout=10,
    ).text
    pattern = re.compile(r'^apiserver_request_total\{[^}]*component="apiserver"[^}]*\} (\S+)$')
    return sum(float(m.group(1)) for line in text.splitlines() if (m := pattern.match(line)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="amber-scale-"))
    cluster = Cluster(work / "cluster", build()["testcluster"])
    cluster.dir.mkdir()
    cluster.start()
    cluster.runner.stop()  # no pods are run: only the operator's reaction is measured
    namespace = "scale"
    cluster.core.create_namespace({"metadata": {"name": namespace}})
    (work / "crd.yaml").write_text(yaml.safe_dump(crd()))
    cluster.kubectl("apply", "-f", str(work / "crd.yaml"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/ambercompressions.amber.dev")

    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "AMBER_RECONCILE_INTERVAL": "10"}
    log = (work / "operator.log").open("w")
    log = (work / "operator.log").open("w")
    operator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "amber",
            "operator",
            "-n",
            namespace,
            "--liveness-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc = psutil.Process(operator.pid)
    time.sleep(5)  # let kopf start its watches

    first_job: dict[str, float] = {}
    batch = client.BatchV1Api(cluster.api)
    stop = threading.Event()

    def watch_jobs():
        stream = watch.Watch().stream(batch.list_namespaced_job, namespace, timeout_seconds=600)
        for event in stream:
            owner = event["object"].metadata.labels.get("amber.dev/resource")
            first_job.setdefault(owner, time.perf_counter())
            if stop.is_set():
                return

    threading.Thread(target=watch_jobs, daemon=True).start()
    docs = [tiny_resource(str(work / "store"), name=f"r{i:03d}") for i in range(args.resources)]
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
    (work / "resources.yaml").write_text(yaml.safe_dump_all(docs))
    before = api_requests(cluster)
    peak = 0.0
    applied = time.perf_counter()
    cluster.kubectl("apply", "-f", str(work / "resources.yaml"))

    def all_started():
        nonlocal peak
        peak = max(peak, proc.memory_info().rss / 2**20)
        return len(first_job) >= args.resources

    wait_for(all_started, 600, 0.2, "a Job for every resource")
    stop.set()
    after = api_requests(cluster)
    delays = sorted(t - applied for t in first_job.values())
    p99 = delays[min(len(delays) - 1, round(0.99 * len(delays)) - 1)]
    print(f"{args.resources} resources applied at once; operator with reconcile interval 10 s")
    print(
        f"apply -> first Job: median {statistics.median(delays):.2f} s, p99 {p99:.2f} s, "
        f"max {delays[-1]:.2f} s"
    )
    print(
        f"API requests per resource (all clients, until every first Job): "
        f"{(after - before) / args.resources:.1f}"
    )
    print(f"operator peak RSS: {peak:.0f} MiB")
    operator.terminate()
    operator.wait(timeout=30)
    log.close()
    cluster.stop()


if __name__ == "__main__":
    main()
