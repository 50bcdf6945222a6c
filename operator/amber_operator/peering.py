"""Is this replica the active one? kopf pauses a replica's handlers while it sees a live
peer of higher priority in the peering object (kopf.dev); a pass that starts outside kopf's
handlers (`requeue`) asks the same question of the same object before it acts, so a standby
never reconciles beside the active replica."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from kubernetes import client


@dataclass(frozen=True)
class Peering:
    name: str
    identity: str
    priority: int
    clusterwide: bool


def outranked(peers: dict, me: Peering, now: datetime) -> bool:
    """Whether a live peer other than `me` has a higher priority (kopf's rule), from the
    peering object's status (identity -> priority, lifetime, lastseen)."""
    for identity, peer in peers.items():
        if identity == me.identity or not peer:
            continue
        seen = datetime.fromisoformat(peer["lastseen"])
        seen = seen if seen.tzinfo else seen.replace(tzinfo=timezone.utc)
        alive = seen + timedelta(seconds=int(peer.get("lifetime", 60))) > now
        if alive and int(peer.get("priority", 0)) > me.priority:
            return True
    return False


def active(api: client.ApiClient, me: Peering | None, namespace: str) -> bool:
    if me is None:  # standalone
        return True
    objects = client.CustomObjectsApi(api)
    try:
        if me.clusterwide:
            found = objects.get_cluster_custom_object(
                "kopf.dev", "v1", "clusterkopfpeerings", me.name
            )
        else:
            found = objects.get_namespaced_custom_object(
                "kopf.dev", "v1", namespace, "kopfpeerings", me.name
            )
    except client.ApiException as err:
        if err.status == 404:
            return True  # no peering object where this resource lives: nobody to defer to
        raise
    return not outranked(found.get("status") or {}, me, datetime.now(timezone.utc))
