"""The Helm chart, the rendered manifests and the images, installed and exercised for real:
`helm install` into the test control plane, the chart's own Deployment started by the pod
runner (with a token of the chart's ServiceAccount, so RBAC is what the chart grants), an
AmberCompression run to Succeeded by that operator, then upgrade and uninstall."""

from __future__ import annotations

import json
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from packaging.requirements import Requirement

from amber.schema import crd
from argocd import health
from kube import wait_for
from trainer_helpers import FAST, ROOT, free_port, tiny_resource

CHART = ROOT / "charts" / "amber-operator"
RELEASE, SYSTEM = "amber-operator", "amber-system"
OPERATOR_SA = f"system:serviceaccount:{SYSTEM}:{RELEASE}"
GROUP, VERSION, PLURAL = "amber.dev", "v1alpha1", "ambercompressions"


def helm(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [cluster.binaries["helm"], f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=300,
    )


def test_chart_lints_clean_and_its_crd_is_the_generated_one(cluster):
    for values in ([], ["--set", "replicas=2", "--set", "watchNamespaces={a,b}"]):
        out = helm(cluster, "lint", "--strict", str(CHART), *values)
        assert "0 chart(s) failed" in out.stdout
    expected = crd()
    expected["metadata"]["annotations"] = {"helm.sh/resource-policy": "keep"}
    assert yaml.safe_load((CHART / "files" / "crd.yaml").read_text()) == expected
    bad = helm(cluster, "lint", str(CHART), "--set", "replicas=0", check=False)
    assert bad.returncode != 0 and "/replicas" in bad.stdout + bad.stderr


def exported_series() -> set[str]:
    """Every series name the operator's metrics endpoint can serve."""
    from prometheus_client import REGISTRY

    from amber_operator import metrics  # noqa: F401 - registers the operator's metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("amber_")
        for suffix in suffixes.get(family.type, ("",))
    }


def series_labels(expr: str) -> set[str]:
    """The labels a PromQL expression's results carry: its `by (...)` clause, else every
    label of the operator's series it reads."""
    from prometheus_client.metrics import MetricWrapperBase

    from amber_operator import metrics

    by = re.search(r"\bby \(([^)]*)\)", expr)
    if by:
        return {name.strip() for name in by.group(1).split(",")}
    known = {
        m._name: set(m._labelnames)
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
    }
    read = {
        re.sub(r"_(total|bucket|sum|count)$", "", s) for s in re.findall(r"\bamber_[a-z_]+", expr)
    }
    return set().union(*(known[name] for name in read))


def test_monitoring_values_render_alerts_and_a_dashboard_of_exported_series(cluster):
    on = ["metrics.serviceMonitor.enabled", "metrics.prometheusRule.enabled",
          "metrics.dashboard.enabled"]  # fmt: skip
    values = [arg for key in on for arg in ("--set", f"{key}=true")]
    assert "0 chart(s) failed" in helm(cluster, "lint", "--strict", str(CHART), *values).stdout

    def render(*args):
        out = helm(cluster, "template", RELEASE, str(CHART), "--namespace", SYSTEM, *args).stdout
        return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}

    assert not {k for k, _ in render()} & {"ServiceMonitor", "PrometheusRule"}  # opt-in
    found = render(*values)
    rule = found[("PrometheusRule", RELEASE)]
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {
        "AmberCompressionStalled",
        "AmberStageRestartsFrequent",
        "AmberReconcileErrors",
        "AmberStageNoProgress",
    }
    assert alerts["AmberCompressionStalled"]["for"] == "15m"
    board = found[("ConfigMap", f"{RELEASE}-dashboard")]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(board["data"]["amber-operator.json"])
    exprs = [r["expr"] for r in alerts.values()]
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set(re.findall(r"\bamber_[a-z_]+", " ".join(exprs)))
    assert used and used <= exported_series(), used - exported_series()
    # What a legend or an alert's text names is a label its expression's results carry.
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            named = set(re.findall(r"{{(\w+)}}", target.get("legendFormat", "")))
            assert named <= series_labels(target["expr"]), (panel["title"], named)
    for name, alert in alerts.items():
        named = set(re.findall(r"\$labels\.(\w+)", json.dumps(alert["annotations"])))
        assert named <= series_labels(alert["expr"]), (name, named)
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Resources by phase", "Time left per run (estimate)", "Reconcile latency"} <= titles
    assert found[("ServiceMonitor", RELEASE)]["spec"]["endpoints"][0]["port"] == "metrics"


def test_rendered_manifests_match_the_chart(cluster):
    rendered = helm(cluster, "template", RELEASE, str(CHART), "--namespace", SYSTEM).stdout
    committed = (ROOT / "manifests" / "install" / "amber-operator.yaml").read_text()
    body = committed.split("\n", 1)[1]  # after the "rendered by" header line
    assert body == rendered, "manifests/install drifted from the chart: run manifests/render.sh"


def _installs(dockerfile: Path) -> tuple[set[str], set[str], list[str]]:
    """(extras the project installs, groups its dependencies are installed from first,
    other requirements pip installs) in a Dockerfile. A dependency layer writes the
    requirements of pyproject's groups into a file (`python -c "...tomllib..." GROUPS > FILE`)
    that `pip install -r FILE` installs."""
    text = dockerfile.read_text().replace("\\\n", " ")
    written = {
        path: set(groups.split())
        for groups, path in re.findall(r"tomllib[^\n]*?\"\s+([\w ]+?)\s*>\s*(\S+)", text)
    }
    extras, first, others = set(), set(), []
    for command in re.findall(r"pip (?:install|wheel) ([^&\n]+)", text):
        words = [word.strip("'\"") for word in command.split()]
        for previous, word in zip(["", *words], words, strict=False):
            if previous == "-r":
                first |= written[word]
            elif word.startswith(("-", "${", "/")) or "://" in word:
                continue
            elif word.startswith(".["):
                extras.update(word[2:-1].split(","))
            elif word not in (".", "wheel"):
                others.append(word)
    return extras, first, others


def test_images_install_the_package_dependency_groups():
    optional: dict[str, list[str]] = {}
    for line in metadata.requires("amber-compression"):
        requirement = Requirement(line)
        extra = re.search(r'extra == "([^"]+)"', str(requirement.marker or ""))
        if extra:
            optional.setdefault(extra.group(1), []).append(
                requirement.name + str(requirement.specifier)
            )
    operator_extras, operator_first, operator_others = _installs(
        ROOT / "images/operator/Dockerfile"
    )
    assert operator_extras == operator_first == {"operator"} and operator_others == []
    trainer_extras, trainer_first, trainer_others = _installs(ROOT / "images/trainer/Dockerfile")
    # quality: data.shapes' text encoder; the dependency layer installs what the package needs
    assert trainer_extras == trainer_first == {"trainer", "quality"}
    # torch is installed first from the CUDA index; its pin must satisfy the trainer group.
    text = (ROOT / "images/trainer/Dockerfile").read_text()
    torch_pin = re.search(r"ARG TORCH=([\d.]+)", text).group(1)
    wanted = next(Requirement(r) for r in optional["trainer"] if r.startswith("torch"))
    assert wanted.specifier.contains(torch_pin)
    assert trainer_others == ["torch==${TORCH}"]
    assert not any(r.startswith(("torch", "deepspeed")) for r in optional["operator"])
    for image in ("operator", "trainer"):
        dockerfile = (ROOT / "images" / image / "Dockerfile").read_text()
        user = re.findall(r"^USER (\S+)", dockerfile, re.M)
        assert user and not user[-1].startswith(("0", "root")), f"{image} runs as root"
        assert "org.opencontainers.image.source" in dockerfile
        # The production bases, as the build arguments' defaults name them: pinned tags.
        defaults = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, re.M))
        stages = set(re.findall(r"^FROM \S+ AS (\S+)", dockerfile, re.M))
        base = [b for b in re.findall(r"^FROM (\S+)", dockerfile, re.M) if b not in stages]
        while any("${" in b for b in base):  # a default may name other arguments
            base = [re.sub(r"\$\{(\w+)\}", lambda m, d=defaults: d[m.group(1)], b) for b in base]
        assert all(":" in b and "$" not in b and not b.endswith(":latest") for b in base), base
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "tests", "amber-store"} <= set(ignored)


def can_i(cluster, verb: str, resource: str, namespace: str | None, who=OPERATOR_SA) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={who}"]
    args += ["-n", namespace] if namespace else []
    return cluster.kubectl(*args, check=False).stdout.strip() == "yes"


def denied(log: str) -> list[str]:
    """Log lines of API calls the operator's RBAC refused."""
    return [line for line in log.splitlines() if re.search(r"\(403\)|[Ff]orbidden", line)]


def operator_pods(cluster):
    pods = cluster.core.list_namespaced_pod(
        SYSTEM, label_selector=f"app.kubernetes.io/instance={RELEASE}"
    ).items
    return [p for p in pods if p.metadata.deletion_timestamp is None]


def running_operator(cluster):
    pods = [p for p in operator_pods(cluster) if p.status.phase == "Running"]
    return pods[0] if len(pods) == 1 else None


@pytest.mark.e2e
@pytest.mark.slow
def check_rbac(cluster, watched: str) -> None:
    """What the operator needs, and nothing it does not; the trainers, nothing at all."""
    for verb, resource in [
        ("create", "jobs"), ("delete", "jobs"), ("get", "secrets"), ("list", "pods"),
        ("create", "configmaps"), ("create", "services"), ("patch", "ambercompressions/status"),
        ("create", "events"),
    ]:  # fmt: skip
        assert can_i(cluster, verb, resource, watched), f"operator cannot {verb} {resource}"
    for verb, resource, ns in [
        ("create", "secrets", watched), ("delete", "pods", watched),
        ("create", "jobs", "default"),
        ("list", "nodes", None), ("create", "clusterrolebindings", None),
        ("get", "secrets", SYSTEM),
    ]:  # fmt: skip
        assert not can_i(cluster, verb, resource, ns), f"operator may {verb} {resource} in {ns}"
    trainer_sa = f"system:serviceaccount:{watched}:amber-trainer"
    assert not can_i(cluster, "get", "pods", watched, who=trainer_sa)


def check_upgrade_changes_nothing(cluster, watched: str, pod, jobs: set[str]) -> None:
    """An upgrade with changed values: a new operator pod with them, and after a few of its
    passes nothing re-run or duplicated (the same Jobs as before)."""
    helm(cluster, "upgrade", RELEASE, str(CHART), "-n", SYSTEM, "--reuse-values",
         "--set", "reconcileInterval=2", "--wait", "--timeout", "3m")  # fmt: skip
    new = wait_for(
        lambda: (p := running_operator(cluster)) and p.metadata.uid != pod.metadata.uid and p,
        120, 0.5, "the upgraded operator pod",
    )  # fmt: skip
    env = {e.name: e.value for e in new.spec.containers[0].env}
    assert env["AMBER_RECONCILE_INTERVAL"] == "2"
    wait_for(
        lambda: cluster.runner.logs(lambda p: p.metadata.uid == new.metadata.uid).count(
            "on_timer"
        ) >= 3,
        120, 0.5, "the upgraded operator to reconcile",
    )  # fmt: skip
    batch = client.BatchV1Api(cluster.api)
    assert {j.metadata.name for j in batch.list_namespaced_job(watched).items} == jobs


def test_helm_install_runs_the_operator_that_runs_a_compression(cluster, tmp_path):
    watched = "chart-runs"
    cluster.core.create_namespace({"metadata": {"name": watched}})
    # The CRD may exist from another test module; the chart must own it.
    cluster.kubectl("delete", "crd", "ambercompressions.amber.dev", "--ignore-not-found")
    ports = [f"livenessPort={free_port()}", f"metrics.port={free_port()}"]
    values = ["--set", f"watchNamespaces={{{watched}}}", "--set", "reconcileInterval=1"]
    for port in ports:
        values += ["--set", port]
    install = helm(
        cluster, "install", RELEASE, str(CHART), "-n", SYSTEM, "--create-namespace",
        *values, "--wait", "--timeout", "3m",
    )  # fmt: skip
    try:
        assert "kubectl -n amber-system rollout status" in install.stdout  # NOTES.txt
        pod = wait_for(lambda: running_operator(cluster), 120, 0.5, "the operator pod")
        assert pod.spec.service_account_name == RELEASE
        # The runner handed the process a token of that ServiceAccount, as a kubelet would.
        identity = (
            cluster.runner.work / f"{SYSTEM}_{pod.metadata.name}" / "serviceaccount.kubeconfig"
        )
        assert yaml.safe_load(identity.read_text())["users"][0]["name"] == RELEASE
        assert pod.spec.containers[0].security_context.read_only_root_filesystem

        check_rbac(cluster, watched)

        # The chart as installed is what runs: a tiny compression to Succeeded.
        doc = tiny_resource(str(tmp_path / "store"), name="charted", **FAST)
        doc["metadata"]["namespace"] = watched
        cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
        objects = client.CustomObjectsApi(cluster.api)

        def resource():
            return objects.get_namespaced_custom_object(GROUP, VERSION, watched, PLURAL, "charted")

        assert health(resource())[0] == "Progressing"
        wait_for(
            lambda: (resource().get("status") or {}).get("phase") == "Succeeded",
            900, 1, "the compression",
        )  # fmt: skip
        assert health(resource())[0] == "Healthy"
        log = cluster.runner.logs(lambda p: p.metadata.uid == pod.metadata.uid)
        assert not denied(log), denied(log)[:3]
        jobs = client.BatchV1Api(cluster.api).list_namespaced_job(watched).items
        spec = jobs[0].spec.template.spec
        assert spec.service_account_name == "amber-trainer"
        assert spec.automount_service_account_token is False

        check_upgrade_changes_nothing(cluster, watched, pod, {j.metadata.name for j in jobs})
        assert resource()["status"]["phase"] == "Succeeded"

    except BaseException:
        # Never leave the operator running for the next tests, whatever failed above.
        helm(cluster, "uninstall", RELEASE, "-n", SYSTEM, "--wait", check=False)
        raise

    # Uninstall: the operator goes; the CRD and everyone's resources stay.
    helm(cluster, "uninstall", RELEASE, "-n", SYSTEM, "--wait")
    wait_for(lambda: not operator_pods(cluster), 120, 0.5, "the operator pod to go")
    assert cluster.kubectl("get", "crd", "ambercompressions.amber.dev", check=False).returncode == 0
    assert resource()["status"]["phase"] == "Succeeded"

    # The plain manifests are valid against this server as they stand.
    dry = cluster.kubectl("apply", "--dry-run=server", "-k", str(ROOT / "manifests" / "install"))
    assert "deployment.apps/amber-operator created (server dry run)" in dry.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_cluster_wide_install_reconciles_any_namespace(cluster, tmp_path):
    """The default values: one ClusterRole, every namespace watched, trainer pods on each
    namespace's default ServiceAccount without a token."""
    anywhere = "chart-anywhere"
    cluster.core.create_namespace({"metadata": {"name": anywhere}})
    values = ["--set", f"livenessPort={free_port()}", "--set", f"metrics.port={free_port()}"]
    helm(cluster, "install", RELEASE, str(CHART), "-n", SYSTEM, "--create-namespace",
         "--set", "reconcileInterval=1", *values, "--wait", "--timeout", "3m")  # fmt: skip
    try:
        wait_for(lambda: running_operator(cluster), 120, 0.5, "the operator pod")
        assert can_i(cluster, "create", "jobs", anywhere)
        assert not can_i(cluster, "create", "secrets", anywhere)
        doc = tiny_resource(str(tmp_path / "store"), name="anywhere", **FAST)
        doc["metadata"]["namespace"] = anywhere
        cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
        batch = client.BatchV1Api(cluster.api)
        [job] = wait_for(lambda: batch.list_namespaced_job(anywhere).items, 120, 0.5, "a Job")
        spec = job.spec.template.spec
        assert spec.service_account_name in (None, "default")
        assert spec.automount_service_account_token is False
        objects = client.CustomObjectsApi(cluster.api)
        status = wait_for(
            lambda: objects.get_namespaced_custom_object(
                GROUP, VERSION, anywhere, PLURAL, "anywhere"
            ).get("status"),
            60, 0.5, "a status",
        )  # fmt: skip
        assert status["phase"] in ("Running", "Succeeded")
        log = cluster.runner.logs(lambda p: p.metadata.namespace == SYSTEM)
        assert not denied(log), denied(log)[:3]
        cluster.kubectl("delete", "amc", "anywhere", "-n", anywhere, "--wait=true")
    finally:
        helm(cluster, "uninstall", RELEASE, "-n", SYSTEM, "--wait")
        wait_for(lambda: not operator_pods(cluster), 120, 0.5, "the operator pod to go")
