"""Prometheus metrics of the operator, served on its metrics port."""

from __future__ import annotations

import contextlib
from typing import get_args

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from amber.api import Phase

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
PHASES = get_args(Phase)
RUN = ["namespace", "resource"]
# The running stage by its name (unique in its resource) and its type (for aggregation).
STAGE = [*RUN, "stage", "type"]
STAGE_PROGRESS = Gauge(
    "amber_stage_progress_ratio", "Steps done of the running stage's total", STAGE
)
STAGE_SAMPLES = Gauge(
    "amber_stage_samples_per_second",
    "Training samples a second of the running stage, all processes",
    STAGE,
)
STAGE_ETA = Gauge("amber_stage_eta_seconds", "Estimated seconds left in the running stage", STAGE)
PIPELINE_ETA = Gauge(
    "amber_pipeline_eta_seconds", "Estimated seconds left in the whole run (an estimate)", RUN
)
STALLED = Gauge(
    "amber_resource_stalled",
    "1 while a resource is Stalled, by the condition's reason",
    [*RUN, "reason"],
)
# Per resource, the label values of the series it has now: removed when they no longer hold.
_series: dict[tuple[str, str], list[tuple[Gauge, tuple[str, ...]]]] = {}


def set_resource(namespace: str, resource: str, status) -> None:
    """A resource's own series from its status: the running stage's progress, rate and time
    left, the run's time left, and Stalled; each gone when it no longer holds."""
    forget(namespace, resource)
    shown = _series[(namespace, resource)] = []

    def put(gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
        gauge.labels(*labels).set(value)
        shown.append((gauge, labels))

    stalled = next((c for c in status.conditions if c.type == "Stalled"), None)
    if stalled is not None and stalled.status == "True":
        put(STALLED, (namespace, resource, stalled.reason), 1)
    running = next((s for s in status.stages if s.phase == "Running"), None)
    if running is None or not running.progress:
        return
    labels = (namespace, resource, running.name, running.type)
    step, total = (int(x) for x in running.progress.split("/"))
    put(STAGE_PROGRESS, labels, step / total if total else 0.0)
    if running.samples_per_second is not None:
        put(STAGE_SAMPLES, labels, running.samples_per_second)
    if running.estimated_remaining_seconds is not None:
        put(STAGE_ETA, labels, running.estimated_remaining_seconds)
    if status.estimated_remaining_seconds is not None:
        put(PIPELINE_ETA, (namespace, resource), status.estimated_remaining_seconds)


def forget(namespace: str, resource: str) -> None:
    """Drop a resource's own series (a pass replaces them; a deleted resource has none)."""
    for gauge, labels in _series.pop((namespace, resource), []):
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)


def serve(port: int) -> None:
    if port:
        start_http_server(port)


def set_phases(phases: dict[str, str]) -> None:
    """Recount resources by phase from the operator's view (uid -> phase)."""
    for phase in PHASES:
        RESOURCES.labels(phase).set(sum(p == phase for p in phases.values()))
