"""kopf handlers: thin. Each gathers the inputs, calls `reconcile.decide`, applies the
actions, writes the status once, then posts the events. Create, resume, spec updates and a
timer all go through the same `reconcile()`: level-based, never chained through phases. A
decision that asks to be looked at again at a time (a retry's backoff) is kept by
`requeue`; the timer is only the slow safety net."""

from __future__ import annotations

import hashlib
import logging
import threading
from datetime import datetime, timezone

import kopf
from kubernetes import client
from pydantic import ValidationError

from amber.api import (
    GROUP,
    PLURAL,
    VERSION,
    AmberCompression,
    AmberCompressionStatus,
    parse_timestamp,
)
from amber.plan import StageRun, plan
from amber.resource import format_errors
from amber_operator import apply, metrics, observe, peering, render
from amber_operator import conditions as c
from amber_operator.reconcile import ObservedJob, decide, decide_invalid
from amber_operator.requeue import Requeue
from amber_operator.settings import Settings

_locks: dict[str, threading.Lock] = {}
_phases: dict[str, str] = {}
_plans: dict[str, tuple[str, list[StageRun]]] = {}  # by uid: the spec's digest, its plan


def _plan(obj: AmberCompression, uid: str) -> list[StageRun]:
    """The resource's plan, made once per spec: every pass of an unchanged resource reuses it.
    A plan reads the spec, the name and the namespace (not the resourceVersion or the
    annotations, which change with every status write)."""
    text = obj.model_dump_json(include={"metadata": {"name", "namespace"}, "spec": True})
    digest = hashlib.sha256(text.encode()).hexdigest()
    cached = _plans.get(uid)
    if cached is None or cached[0] != digest:
        cached = _plans[uid] = (digest, plan(obj))
    return cached[1]


def api_client(workers: int) -> client.ApiClient:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    # One kept-alive connection per worker: a smaller pool drops connections under load,
    # and each new one costs a TLS handshake.
    configuration.connection_pool_maxsize = workers
    return client.ApiClient(configuration)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    ours: Settings = memo.settings
    # Keep kopf's bookkeeping out of our status (its schema is ours, and structural).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="amber.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="amber.dev")
    # Watches can stall silently behind some load balancers without these timeouts.
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    # Our events are posted as such (kopf.event); kopf's echo of every INFO log line as an
    # Event would double each of them and add a "handler succeeded" one to every pass.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = ours.workers
    memo.api = api_client(ours.workers)
    memo.requeue = Requeue(lambda key: requeued(key, memo))
    metrics.serve(ours.metrics_port)


def requeued(key: tuple[str, str], memo: kopf.Memo) -> None:
    """A pass that a decision asked for at a time, on the resource as it is now; none in a
    standby replica (the active one keeps its own times)."""
    logger = logging.getLogger("amber_operator.requeue")
    try:
        if not peering.active(memo.api, memo.get("peering"), key[0]):
            return
        namespace, name = key
        raw = client.CustomObjectsApi(memo.api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
    except client.ApiException as err:
        if err.status != 404:  # gone: nothing to do
            logger.warning("%s/%s: %s; trying again in 10 s", *key, err.reason)
            memo.requeue.at(key, 10)
        return
    try:
        reconcile(kopf.Body(raw), memo, logger)
    except kopf.PermanentError:
        pass
    except Exception:
        logger.exception("%s/%s: the pass failed; trying again in 10 s", *key)
        memo.requeue.at(key, 10)


class _Stale(Exception):
    """The status changed since the body this pass decided on was read."""


def _write_status(api: client.ApiClient, body: kopf.Body, old: dict, new: dict) -> None:
    """A merge patch that also clears fields the new status no longer has, made only if the
    resource is still the version this pass read: two passes that both started from an old
    body (a watch event's, the Job index's) must not let the later one undo the earlier's
    counts."""
    patch = {
        "metadata": {"resourceVersion": body.metadata.get("resourceVersion")},
        "status": {**{k: None for k in old if k not in new}, **new},
    }
    try:
        client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
            GROUP, VERSION, body.metadata.namespace, PLURAL, body.metadata.name, patch
        )
    except client.ApiException as err:
        if err.status == 409:
            raise _Stale() from None
        raise


# A pass that lost the race decides again on the resource as it is now; more than this many
# losses in a row means something else writes the status, and the next pass will see it.
STALE_RETRIES = 3


def reconcile(body: kopf.Body, memo: kopf.Memo, logger) -> None:
    uid = body.metadata.uid
    lock = _locks.setdefault(uid, threading.Lock())
    with lock, metrics.RECONCILE_SECONDS.time():
        try:
            for retry in range(STALE_RETRIES + 1):
                try:
                    again = _reconcile(body, memo.api, memo.settings, logger)
                    break
                except _Stale:
                    if retry == STALE_RETRIES:
                        raise
                    body = _fresh(memo.api, body)
                    if body is None:  # deleted meanwhile
                        return
        except kopf.PermanentError:
            raise
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
    key = (body.metadata.namespace, body.metadata.name)
    if again is None or memo.get("timer_only"):
        memo.requeue.cancel(key)
    else:
        memo.requeue.at(key, again)


def _fresh(api: client.ApiClient, body: kopf.Body) -> kopf.Body | None:
    try:
        raw = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, body.metadata.namespace, PLURAL, body.metadata.name
        )
    except client.ApiException as err:
        if err.status == 404:
            return None
        raise
    return kopf.Body(raw)


def _reconcile(body: kopf.Body, api: client.ApiClient, settings: Settings, logger) -> float | None:
    """One pass; when the resource asks to be looked at again, in how many seconds."""
    ns, name = body.metadata.namespace, body.metadata.name
    generation = body.metadata.get("generation")
    old_status = dict(body.get("status") or {})
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    try:
        obj = AmberCompression.model_validate(
            {k: dict(body[k]) for k in ("metadata", "spec")}
            | {"apiVersion": body["apiVersion"], "kind": body["kind"]}
        )
    except ValidationError as err:
        why = "; ".join(format_errors(err))
        status = AmberCompressionStatus.model_validate(old_status or {})
        decision = decide_invalid(status, why, now, generation)
        _write_status(api, body, old_status, decision.status.dump())
        for event in decision.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        raise kopf.PermanentError(why) from None

    status = AmberCompressionStatus.model_validate(old_status) if old_status else None
    status = status or AmberCompressionStatus()
    runs = _plan(obj, body.metadata.uid)
    observed = observe.observe(api, obj, runs, settings.lease_ttl, body.metadata.uid)
    decision = decide(obj, status, observed, now, generation, runs=runs)
    apply.apply(
        api,
        obj,
        runs,
        dict(body),
        decision.actions,
        lambda: observe.store_for(api, obj),
        settings.trainer_service_account,
    )

    # One status write per pass, and only when something changed; events after it.
    new_status = decision.status.dump()
    if new_status != old_status:
        _write_status(api, body, old_status, new_status)
    types = {s.name: s.type for s in decision.status.stages}
    for event in decision.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        if event.reason in (c.STAGE_FAILED, c.STAGE_DISRUPTED):
            kind = "disruption" if event.reason == c.STAGE_DISRUPTED else "failure"
            stage_type = types.get(decision.status.current_stage or "", "")
            metrics.RESTARTS.labels(stage_type, kind).inc()
        logger.info("%s: %s", event.reason, event.message)
    for before, after in zip(status.stages, decision.status.stages, strict=False):
        if before.phase != "Succeeded" and after.phase == "Succeeded" and after.start_time:
            started = parse_timestamp(after.start_time)
            metrics.STAGE_SECONDS.labels(after.type).observe((now - started).total_seconds())
    _phases[body.metadata.uid] = decision.status.phase
    metrics.set_phases(_phases)
    metrics.set_resource(ns, name, decision.status)
    return decision.requeue_after


@kopf.on.create(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", backoff=5)
def on_change(body: kopf.Body, memo: kopf.Memo, logger, **_) -> None:
    reconcile(body, memo, logger)


def on_timer(body: kopf.Body, memo: kopf.Memo, logger, **_) -> None:
    reconcile(body, memo, logger)


def register(settings: Settings) -> None:
    """What needs the settings to be registered: the safety-net timer, at their interval.
    Its first pass waits an interval: a resource's first pass is its create (or resume)
    handler's, which it must not race for the same status. The other handlers register on
    import."""
    every = settings.reconcile_interval
    kopf.timer(GROUP, VERSION, PLURAL, interval=every, initial_delay=every)(on_timer)


@kopf.index(GROUP, VERSION, PLURAL)
def resources(body: kopf.Body, **_) -> dict:
    """Every AmberCompression by namespace and name, as last seen, for its Jobs' events."""
    return {(body.metadata.namespace, body.metadata.name): body}


@kopf.on.event("batch", "v1", "jobs", labels={render.LABEL_RESOURCE: kopf.PRESENT})
def on_job(
    event: dict, body: kopf.Body, resources: kopf.Index, memo: kopf.Memo, logger, **_
) -> None:
    """A stage Job finished or went away, or its queue admitted or preempted it: reconcile
    its resource now, so the next stage (or the retry) does not wait for the timer, which
    stays as the slow safety net, and the status says at once whether the stage runs."""
    if memo.get("timer_only"):
        return
    job = observe.job_state(body)
    ended = event.get("type") == "DELETED" or job.finished is not None
    key = (body.metadata.namespace, body.metadata.labels[render.LABEL_RESOURCE])
    for owner in resources.get(key, []):
        if ended or _admission_changed(owner, job):
            reconcile(owner, memo, logger)


def _admission_changed(owner: kopf.Body, job: ObservedJob) -> bool:
    """Whether a running Job's suspension disagrees with its stage's phase as last written:
    Queued while the Job runs (admitted), or Running while it is suspended (preempted)."""
    for stage in (owner.get("status") or {}).get("stages") or []:
        if stage.get("name") == job.stage and stage.get("job") == job.name:
            return stage.get("phase") == ("Running" if job.suspended else "Queued")
    return False


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def on_delete(body: kopf.Body, memo: kopf.Memo, **_) -> None:
    # Children go with their owner (garbage collector); forget our bookkeeping.
    memo.requeue.cancel((body.metadata.namespace, body.metadata.name))
    metrics.forget(body.metadata.namespace, body.metadata.name)
    _phases.pop(body.metadata.uid, None)
    _locks.pop(body.metadata.uid, None)
    _plans.pop(body.metadata.uid, None)
    observe.forget(body.metadata.uid)
    metrics.set_phases(_phases)
