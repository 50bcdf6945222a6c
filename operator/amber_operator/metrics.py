"""Prometheus metrics of the operator, served on its metrics port."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RESOURCES = Gauge("amber_resources", "AmberCompression resources by phase", ["phase"])
STAGE_SECONDS = Histogram(
    "amber_stage_duration_seconds",
    "Wall time of finished stages",
    ["type"],
    buckets=(10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 48 * 3600, float("inf")),
)
RESTARTS = Counter("amber_stage_restarts_total", "Failed stage attempts, by kind", ["type", "kind"])
RECONCILE_SECONDS = Histogram("amber_reconcile_seconds", "Time of one reconcile pass")
RECONCILE_ERRORS = Counter("amber_reconcile_errors_total", "Reconcile passes that raised")
PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")
RUN = ["namespace", "resource"]
STAGE_PROGRESS = Gauge(
    "amber_stage_progress_ratio", "Steps done of the running stage's total", [*RUN, "type"]
)
STAGE_SAMPLES = Gauge(
    "amber_stage_samples_per_second",
    "Training samples a second of the running stage, all processes",
    [*RUN, "type"],
)
STAGE_ETA = Gauge(
    "amber_stage_eta_seconds", "Estimated seconds left in the running stage", [*RUN, "type"]
)
PIPELINE_ETA = Gauge(
    "amber_pipeline_eta_seconds", "Estimated seconds left in the whole run (an estimate)", RUN
)
_shown: dict[tuple[str, str], str] = {}  # resource -> the stage type its gauges carry


def serve(port: int) -> None:
    if port:
        start_http_server(port)


def set_phases(phases: dict[str, str]) -> None:
    """Recount resources by phase from the operator's view (uid -> phase)."""
    for phase in PHASES:
        RESOURCES.labels(phase).set(sum(p == phase for p in phases.values()))


def set_progress(namespace: str, resource: str, status) -> None:
    """The running stage's gauges from a resource's status; none when nothing runs."""
    key = (namespace, resource)
    forget(namespace, resource)
    running = next((s for s in status.stages if s.phase == "Running"), None)
    if running is None or not running.progress:
        return
    labels = (namespace, resource, running.type)
    step, total = (int(x) for x in running.progress.split("/"))
    STAGE_PROGRESS.labels(*labels).set(step / total if total else 0.0)
    if running.samples_per_second is not None:
        STAGE_SAMPLES.labels(*labels).set(running.samples_per_second)
    if running.estimated_remaining_seconds is not None:
        STAGE_ETA.labels(*labels).set(running.estimated_remaining_seconds)
    if status.estimated_remaining_seconds is not None:
        PIPELINE_ETA.labels(namespace, resource).set(status.estimated_remaining_seconds)
    _shown[key] = running.type


def forget(namespace: str, resource: str) -> None:
    """Drop a resource's progress series (its stage finished, or it was deleted)."""
    stage_type = _shown.pop((namespace, resource), None)
    if stage_type is not None:
        for gauge in (STAGE_PROGRESS, STAGE_SAMPLES, STAGE_ETA):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, resource, stage_type)
    with contextlib.suppress(KeyError):
        PIPELINE_ETA.remove(namespace, resource)
