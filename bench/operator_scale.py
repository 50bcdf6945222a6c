"""Operator at scale: N resources applied at once against the test control plane.

    python bench/operator_scale.py [--resources 100 1000] [--modes events timer]

Starts the control plane from tests/cluster (no pod runner: only the operator's reaction is
measured) and, for each N and each mode, the operator as its own process in a namespace of
its own, then applies N tiny AmberCompressions in one `kubectl apply`. Measured:

- apply -> each resource's first Job (median, p99, max), and each resource's own creation
  (as the API server announced it on a watch) -> its first Job: `kubectl apply` creates
  them one by one, so for the last of 1,000 the first figure includes kubectl's time
  (printed too);
- a stage ending -> the next stage's Job: for every resource at once, the first stage's
  output is committed in storage and its Job deleted (as a pod that finished instantly
  would leave it: the operator reads storage, never trusts a Job's word), and the time to
  the second stage's Job is taken (median, p99);
- API requests per resource until every first Job (the apiserver's own
  `apiserver_request_total`, all clients), the operator's peak RSS and CPU seconds.

Modes: `events` is the operator as shipped (Job watch, retries at their backoff, the 60 s
safety-net timer); `timer` is the baseline, the operator reacting to its timer alone
(`--timer-only`) at a 10 s interval, as it did before the Job watch.
"""

from __future__ import annotations

import argparse
import contextlib
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

from amber import commits
from amber.plan import OUTPUT, plan
from amber.resource import parse
from amber.schema import crd
from amber.storage import open_store
from kube import Cluster, build, wait_for
from trainer_helpers import free_port, tiny_resource


def api_requests(cluster: Cluster) -> dict[str, float]:
    """Requests the apiserver has served, by verb and resource ("patch ambercompressions
    /status"), all clients."""
    info = json.loads((cluster.dir / "ready").read_text())
    text = requests.get(
        f"{info['server']}/metrics",
        headers={"Authorization": f"Bearer {info['token']}"},
        verify=False,
        timeout=10,
    ).text
    pattern = re.compile(r'^apiserver_request_total\{([^}]*component="apiserver"[^}]*)\} (\S+)$')
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if m := pattern.match(line):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            sub = labels.get("subresource", "")
            key = f"{labels.get('verb', '?').lower()} {labels.get('resource', '?')}"
            key += f"/{sub}" if sub else ""
            counts[key] = counts.get(key, 0.0) + float(m.group(2))
    return counts


MODES = {
    "events": ([], "60"),  # as shipped: the timer is only the safety net
    "timer": (["--timer-only"], "10"),  # the baseline: a 10 s timer and nothing else
}


def quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
    return statistics.median(ordered), p99, ordered[-1]


class Watcher:
    """When the API server announced each resource, and when each (resource, stage) Job
    appeared, from two watches on their own threads."""

    def __init__(self, cluster: Cluster, namespace: str):
        self.cluster, self.namespace = cluster, namespace
        self.created: dict[tuple[str, str], float] = {}  # (resource, stage) -> its Job's time
        self.born: dict[str, float] = {}  # resource -> its time
        self.lock = threading.Lock()  # the watch threads add while the caller counts
        self.stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._jobs, daemon=True).start()
        threading.Thread(target=self._resources, daemon=True).start()

    def _jobs(self) -> None:
        batch = client.BatchV1Api(self.cluster.api)
        stream = watch.Watch().stream(
            batch.list_namespaced_job, self.namespace, timeout_seconds=1800
        )
        with contextlib.suppress(Exception):  # the stream ends with the cluster
            for event in stream:
                labels = event["object"].metadata.labels
                key = (labels.get("amber.dev/resource"), labels.get("amber.dev/stage"))
                with self.lock:
                    self.created.setdefault(key, time.perf_counter())
                if self.stop.is_set():
                    return

    def _resources(self) -> None:
        custom = client.CustomObjectsApi(self.cluster.api)
        stream = watch.Watch().stream(
            custom.list_namespaced_custom_object,
            "amber.dev",
            "v1alpha1",
            self.namespace,
            "ambercompressions",
            timeout_seconds=1800,
        )
        with contextlib.suppress(Exception):
            for event in stream:
                if event["type"] == "ADDED":
                    with self.lock:
                        name = event["object"]["metadata"]["name"]
                        self.born.setdefault(name, time.perf_counter())
                if self.stop.is_set():
                    return

    def jobs_of(self, stage: str) -> int:
        with self.lock:
            return sum(k[1] == stage for k in self.created)

    def delays(self, stage: str, since) -> list[float]:
        """Seconds from `since(resource)` to its `stage` Job."""
        with self.lock:
            return [t - since(k[0]) for k, t in self.created.items() if k[1] == stage]


def start_operator(cluster: Cluster, work: Path, namespace: str, mode: str):
    """`amber operator` on `namespace` as `mode` runs it: its process, log file, psutil view."""
    flags, interval = MODES[mode]
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "AMBER_RECONCILE_INTERVAL": interval,
    }
    log = (work / f"operator-{namespace}.log").open("w")
    command = [sys.executable, "-m", "amber", "operator", "-n", namespace]
    ports = ["--liveness-port", str(free_port()), "--metrics-port", str(free_port())]
    operator = subprocess.Popen(
        [*command, *ports, *flags], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    time.sleep(5)  # let kopf start its watches
    return operator, log, psutil.Process(operator.pid)


def end_first_stage(cluster: Cluster, namespace: str, docs: list, first: str) -> dict:
    """Every resource's first stage ends at once (its output committed, its Job gone); when
    each Job went, by resource."""
    for doc in docs:
        run = plan(parse(doc))[0]
        commits.write_marker(open_store(run.run_uri), f"{first}/{OUTPUT}", 1, {}, {}, run.spec_hash)
    batch = client.BatchV1Api(cluster.api)
    ended = {}
    for job in batch.list_namespaced_job(namespace, label_selector="amber.dev/stage").items:
        batch.delete_namespaced_job(job.metadata.name, namespace, propagation_policy="Background")
        ended[job.metadata.labels["amber.dev/resource"]] = time.perf_counter()
    return ended


def measure(cluster: Cluster, work: Path, count: int, mode: str) -> dict:
    namespace = f"scale-{mode}-{count}"
    cluster.core.create_namespace({"metadata": {"name": namespace}})
    operator, log, proc = start_operator(cluster, work, namespace, mode)
    watcher = Watcher(cluster, namespace)
    watcher.start()
    store_uri = str(work / f"store-{namespace}")
    docs = [tiny_resource(store_uri, name=f"r{i:04d}") for i in range(count)]
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
    (work / "resources.yaml").write_text(yaml.safe_dump_all(docs))
    first, second = (plan(parse(docs[0]))[i].stage.name for i in (0, 1))
    before = api_requests(cluster)
    peak = 0.0

    def started(stage):
        nonlocal peak
        peak = max(peak, proc.memory_info().rss / 2**20)
        return watcher.jobs_of(stage) >= count

    applied = time.perf_counter()
    cluster.kubectl("apply", "-f", str(work / "resources.yaml"))
    applying = time.perf_counter() - applied  # kubectl creates them one by one
    wait_for(lambda: started(first), 1800, 0.2, "a Job for every resource")
    after = api_requests(cluster)
    first_delays = watcher.delays(first, lambda resource: applied)
    reactions = watcher.delays(first, lambda resource: watcher.born[resource])

    ended = end_first_stage(cluster, namespace, docs, first)
    wait_for(lambda: started(second), 1800, 0.2, "the second stage's Job for every resource")
    watcher.stop.set()
    next_delays = watcher.delays(second, lambda resource: ended[resource])
    cpu = proc.cpu_times()
    operator.terminate()
    operator.wait(timeout=60)
    log.close()
    return {
        "first": quantiles(first_delays),
        "reaction": quantiles(reactions),
        "applying": applying,
        "next": quantiles(next_delays),
        "requests": (sum(after.values()) - sum(before.values())) / count,
        "by_kind": {
            k: (after[k] - before.get(k, 0.0)) / count
            for k in sorted(after, key=lambda k: before.get(k, 0.0) - after[k])
            if after[k] - before.get(k, 0.0) >= count / 10
        },
        "rss": peak,
        "cpu": cpu.user + cpu.system,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="amber-scale-"))
    cluster = Cluster(work / "cluster", build()["testcluster"])
    cluster.dir.mkdir()
    cluster.start()
    cluster.runner.stop()  # no pods are run: only the operator's reaction is measured
    (work / "crd.yaml").write_text(yaml.safe_dump(crd()))
    cluster.kubectl("apply", "-f", str(work / "crd.yaml"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/ambercompressions.amber.dev")
    try:
        rows = []
        for n in args.resources:
            for mode in args.modes:
                rows.append((n, mode, measure(cluster, work, n, mode)))
                print(f"measured N={n} {mode}: {rows[-1][2]}", flush=True)
    finally:
        cluster.stop()
    print("mode: events = Job watch + retries at their time + 60 s timer (as shipped);")
    print("      timer = the 10 s timer alone (the baseline)")
    print(
        f"{'N':>5} {'mode':<7} {'apply->first Job s (median/p99/max)':>36} "
        f"{'created->first Job s':>22} {'stage end->next Job s (median/p99/max)':>40} "
        f"{'req/res':>8} {'RSS MiB':>8} {'CPU s':>6} {'kubectl s':>9}"
    )
    for n, mode, r in rows:
        first = "/".join(f"{x:.2f}" for x in r["first"])
        reaction = "/".join(f"{x:.2f}" for x in r["reaction"])
        after = "/".join(f"{x:.2f}" for x in r["next"])
        print(
            f"{n:>5} {mode:<7} {first:>36} {reaction:>22} {after:>40} {r['requests']:>8.1f} "
            f"{r['rss']:>8.0f} {r['cpu']:>6.1f} {r['applying']:>9.1f}"
        )
    for n, mode, r in rows:
        shown = ", ".join(f"{k} {v:.1f}" for k, v in r["by_kind"].items())
        print(f"N={n} {mode}: requests per resource until every first Job: {shown}")
    for n in args.resources:
        got = {mode: r for m, mode, r in ((x[0], x[1], x[2]) for x in rows) if m == n}
        if {"events", "timer"} <= got.keys():
            e, t = got["events"], got["timer"]
            print(
                f"N={n}: stage end->next Job p99 {e['next'][1]:.2f} s vs {t['next'][1]:.2f} s "
                f"({e['next'][1] / t['next'][1]:.2f}x); apply->first Job p99 "
                f"{e['first'][1]:.2f} s vs {t['first'][1]:.2f} s; requests per resource "
                f"{e['requests']:.1f} vs {t['requests']:.1f}"
            )


if __name__ == "__main__":
    main()
