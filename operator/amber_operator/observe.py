"""Reading the world for one reconcile pass: the resource's Jobs (and their pods' termination
messages) and what storage holds, read again only where it can have changed since the
resource's last pass (`read_whole`). `job_state` and `read_whole` are pure; the rest is I/O at
the edge."""

from __future__ import annotations

import base64
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime

from kubernetes import client
from kubernetes.client.rest import ApiException

from amber import commits, lease, state
from amber.api import AmberCompression
from amber.layout import FINAL
from amber.plan import StageRun, run_uri
from amber.records import StageResult
from amber.storage import StorageError, Store, open_store, s3_client
from amber_operator import render
from amber_operator.reconcile import Observed, ObservedJob

log = logging.getLogger(__name__)

# The Job controller names the podFailurePolicy rule that failed a Job; rule 0 is ours for
# DisruptionTarget (see render.job).
DISRUPTION_RULE = re.compile(r"matching FailJob rule at index 0")


def _time(value) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def job_state(job: dict, termination: str = "") -> ObservedJob:
    """An ObservedJob from a Job (as a dict) and pod 0's termination message."""
    meta, status = job["metadata"], job.get("status") or {}
    finished, finished_at, message = None, None, ""
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond["type"] in ("Complete", "Failed"):
            finished = cond["type"]
            finished_at = _time(cond.get("lastTransitionTime"))
            message = cond.get("message") or cond.get("reason") or ""
    result = StageResult.parse(termination) if termination else None
    if result is None and termination:  # the container died before reporting: its log's tail
        message = termination[-500:]
    elif result is not None and result.message and finished == "Failed":
        message = result.message
    labels = meta.get("labels") or {}
    return ObservedJob(
        name=meta["name"],
        stage=labels.get(render.LABEL_STAGE, ""),
        spec_hash=labels.get(render.LABEL_SPEC_HASH, ""),
        attempt=int(labels.get(render.LABEL_ATTEMPT, "0")),
        finished=finished,
        finished_at=finished_at.replace(tzinfo=None) if finished_at else None,
        disrupted=finished == "Failed" and bool(DISRUPTION_RULE.search(message)),
        suspended=bool((job.get("spec") or {}).get("suspend")),
        message=message,
        result=result,
    )


def jobs(api: client.ApiClient, obj: AmberCompression) -> tuple[ObservedJob, ...]:
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    ns, name = obj.metadata.namespace, obj.metadata.name
    selector = f"{render.LABEL_RESOURCE}={name}"
    found = []
    items = batch.list_namespaced_job(ns, label_selector=selector).items
    # Pods only where there are Jobs: a resource's passes before its first Job cost one read.
    pods = core.list_namespaced_pod(ns, label_selector=selector).items if items else []
    for item in items:
        body = api.sanitize_for_serialization(item)
        termination = ""
        for pod in pods:
            owner = (pod.metadata.labels or {}).get("job-name")
            index = (pod.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index")
            if owner == item.metadata.name and index in (None, "0"):
                for status in pod.status.container_statuses or []:
                    term = status.state.terminated if status.state else None
                    if term and term.message:
                        termination = term.message
        found.append(job_state(body, termination))
    return tuple(found)


# One S3 client per endpoint and credentials, shared by every pass of every resource
# (boto3 clients are thread-safe; building one per pass dominated a pass's CPU time).
_clients: dict[tuple, object] = {}


def store_for(api: client.ApiClient, obj: AmberCompression) -> Store:
    """The resource's store, with credentials from its Secret when it names one."""
    storage = obj.spec.storage
    folder = run_uri(storage.uri, obj.metadata.namespace, obj.metadata.name)
    if not folder.startswith("s3://"):
        return open_store(folder)
    access = secret = None
    ref = storage.credentials_secret
    if ref is not None:
        found = client.CoreV1Api(api).read_namespaced_secret(ref.name, obj.metadata.namespace)
        data = {k: base64.b64decode(v).decode() for k, v in (found.data or {}).items()}
        access, secret = data.get(ref.access_key_id_key), data.get(ref.secret_access_key_key)
    key = (storage.endpoint, storage.region, access, secret)
    if key not in _clients:
        _clients[key] = s3_client(
            storage.endpoint, storage.region, access_key=access, secret_key=secret
        )
    return open_store(folder, client=_clients[key])


# Storage is read whole at least this often, for what no Job of ours does (an output deleted or
# copied by hand); between such reads only what can have changed is read again.
FULL_READ_SECONDS = 60.0


@dataclass(frozen=True)
class Seen:
    """A resource's storage as its last pass read it, and its Jobs at that moment."""

    committed: dict[str, str]  # stage -> its committed output's spec hash
    final_committed: bool
    running: frozenset[str]  # names of the Jobs running then
    finished: frozenset[str]  # and of those finished by then
    whole_at: float  # time.monotonic() of the last read of every stage


_seen: dict[str, Seen] = {}  # by resource uid


def read_whole(before: Seen | None, jobs: tuple[ObservedJob, ...], now: float) -> bool:
    """Whether this pass must read every stage's output. Only a Job of the resource's changes
    storage behind the operator's back: one that ended (or went away) since the last read may
    have committed its stage or quarantined a damaged input of it; one still running changes
    only its own stage, which every pass reads."""
    if before is None or now - before.whole_at >= FULL_READ_SECONDS:
        return True
    running = {j.name for j in jobs if j.finished is None}
    finished = {j.name for j in jobs if j.finished is not None}
    return bool(finished - before.finished or before.running - running)


def storage(store: Store, runs: list[StageRun], before: Seen | None, whole: bool) -> dict:
    """Committed outputs per stage; progress and newest checkpoint of the first stage without
    a committed output (the one `decide` will run). Unless `whole`, a stage `before` saw
    committed with its current spec hash is not read again, nor any stage after the first
    one still without its output (nothing runs it before that one is done)."""
    committed = {} if whole or before is None else dict(before.committed)
    pending = None

    def damaged(message: str) -> None:
        log.warning("%s: %s", store, message)

    progress, checkpoint = None, None
    for run in runs:
        name = run.stage.name
        if not whole and (pending is not None or committed.get(name) == run.spec_hash):
            continue
        # Read-only and sizes only: a damaged output counts as not committed, and the stage's
        # own trainer quarantines it when the operator runs the stage again. Only the first
        # stage not committed (the one `decide` runs) is read in detail.
        found = state.read(
            store, run, damaged, checksums=False, repair=False, detail=pending is None
        )
        if found.output is None:
            committed.pop(name, None)
        else:
            committed[name] = found.output.spec_hash
        if pending is None and not found.committed:
            pending, progress, checkpoint = name, found.progress, found.checkpoint
    final = before.final_committed if before is not None else False
    if whole or before is None or (pending is None and not final):
        manifest = commits.read_output(store, FINAL, damaged, checksums=False, repair=False)
        final = manifest is not None
    return {
        "committed": committed,
        "stage": pending,
        "progress": progress,
        "checkpoint": checkpoint,
        "final_committed": final,
    }


def forget(uid: str) -> None:
    _seen.pop(uid, None)


def observe(
    api: client.ApiClient, obj: AmberCompression, runs: list[StageRun], lease_ttl: float, uid: str
) -> Observed:
    """Jobs, storage and the run's lease; the lease is held for `lease_ttl` seconds, longer
    than the gap between two passes of an idle resource (the safety-net timer's)."""
    found = jobs(api, obj)  # before storage: a Job seen Complete has committed by then
    now = time.monotonic()
    before = _seen.pop(uid, None)  # kept again below only if this read succeeds
    whole = read_whole(before, found, now)
    try:
        store = store_for(api, obj)
        seen = storage(store, runs, before, whole)
        # The operator holds the run's lease while the run has work left, as `amber run`
        # does, so the two never write one folder at once.
        holder = f"operator/{obj.metadata.namespace}/{obj.metadata.name}"
        other = None
        if seen["stage"] is not None or not seen["final_committed"]:
            other = lease.hold(store, holder, "operator", lease_ttl)
        else:
            lease.let_go(store, holder)
    except (StorageError, ApiException, OSError, KeyError) as err:
        return Observed(jobs=found, storage_error=f"storage {obj.spec.storage.uri}: {err}")
    if other is None:  # while someone else holds the folder, anything in it may change
        _seen[uid] = Seen(
            committed=seen["committed"],
            final_committed=seen["final_committed"],
            running=frozenset(j.name for j in found if j.finished is None),
            finished=frozenset(j.name for j in found if j.finished is not None),
            whole_at=now if whole else before.whole_at,
        )
    return Observed(jobs=found, held_by=other.describe() if other else None, **seen)
