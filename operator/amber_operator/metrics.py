"""Prometheus metrics of the operator, served on its metrics port."""

from __future__ import annotations

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


def serve(port: int) -> None:
    if port:
        start_http_server(port)


def set_phases(phases: dict[str, str]) -> None:
    """Recount resources by phase from the operator's view (uid -> phase)."""
    for phase in PHASES:
        RESOURCES.labels(phase).set(sum(p == phase for p in phases.values()))
