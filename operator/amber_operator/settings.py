"""The operator's settings in one typed object, read once when it starts: the chart passes
its values as environment variables, `amber operator`'s options come on top, and the
handlers read the object from kopf's memo, never the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, Field, ValidationError

from amber import lease
from amber.errors import InvalidInput


class Settings(BaseModel):
    reconcile_interval: float = Field(
        60.0, gt=0, description="Seconds between the safety-net timer's passes of a resource."
    )
    # A pass mostly waits on the API server and storage (six or so round trips), so a pool
    # sized by cores (Python's default, 6 on two) leaves a busy operator idle; this bounds
    # threads and connections, never one per resource.
    workers: int = Field(32, ge=1, description="Passes at once (and API connections).")
    trainer_service_account: str = Field(
        "", description="The ServiceAccount of trainer pods (the chart makes one, no rights)."
    )
    metrics_port: int = Field(9090, ge=0, description="Prometheus metrics port (0: off).")

    @property
    def lease_ttl(self) -> float:
        """How long the run's lease is held: three timer intervals, since a resource with
        nothing happening is passed only by the timer and must not lose its lease between
        two passes (an `amber run` could start on the folder the operator is running)."""
        return max(lease.TTL_SECONDS, 3 * self.reconcile_interval)


ENVIRONMENT = {
    "reconcile_interval": "AMBER_RECONCILE_INTERVAL",
    "workers": "AMBER_WORKERS",
    "trainer_service_account": "AMBER_TRAINER_SERVICE_ACCOUNT",
    "metrics_port": "AMBER_METRICS_PORT",
}


def from_environment(env: Mapping[str, str] = os.environ, **given) -> Settings:
    """The settings from `env` (`ENVIRONMENT` names the variables), with `given` on top; a
    value that does not parse is an `InvalidInput` naming its variable."""
    found = {field: env[name] for field, name in ENVIRONMENT.items() if name in env}
    try:
        return Settings.model_validate({**found, **given})
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0])
        where = ENVIRONMENT[field] if field in found and field not in given else field
        raise InvalidInput(f"{where}: {first['msg']}") from None
