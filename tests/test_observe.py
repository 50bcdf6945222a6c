"""What an operator pass reads from storage: every stage on a resource's first pass, after a
Job of it ended and at least once a minute; otherwise only the stage that can have changed.
On the real local store and the loopback S3 server, each read counted on its way through."""

from __future__ import annotations

import pytest

from amber import commits
from amber.plan import OUTPUT, plan
from amber.resource import parse
from amber.storage import Store, open_store
from amber_operator.observe import FULL_READ_SECONDS, Seen, read_whole, storage
from amber_operator.reconcile import ObservedJob
from trainer_helpers import tiny_resource


class Counted(Store):
    """A real store whose reads are written down (key or prefix) before they are made."""

    def __init__(self, inner: Store):
        self.inner, self.uri, self.reads = inner, inner.uri, []

    def read_bytes(self, key):
        self.reads.append(key)
        return self.inner.read_bytes(key)

    def list(self, prefix=""):
        self.reads.append(prefix + "/")
        return self.inner.list(prefix)

    def exists(self, key):
        self.reads.append(key)
        return self.inner.exists(key)

    def markers(self) -> list[str]:
        """The stage outputs (and final/) whose commit marker this pass read."""
        found = [k.split("/")[0] for k in self.reads if k.endswith(f"/{commits.MARKER}")]
        return list(dict.fromkeys(found))

    def write_bytes(self, key, data):
        self.inner.write_bytes(key, data)

    def upload(self, path, key):
        self.inner.upload(path, key)

    def download(self, key, path):
        self.inner.download(key, path)

    def delete(self, prefix):
        self.inner.delete(prefix)

    def copy(self, source, key):
        self.inner.copy(source, key)

    def child(self, prefix):
        return Counted(self.inner.child(prefix))

    def read_versioned(self, key):
        self.reads.append(key)
        return self.inner.read_versioned(key)

    def create(self, key, data):
        return self.inner.create(key, data)

    def replace(self, key, data, version):
        return self.inner.replace(key, data, version)

    def sha256(self, key):
        return self.inner.sha256(key)


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path):
    if request.param == "local":
        uri = str(tmp_path / "store")
    else:
        uri = f"s3://{request.getfixturevalue('bucket')}/runs"
    obj = parse(tiny_resource(uri, name="scan"))
    runs = plan(obj)
    return obj, runs, Counted(open_store(runs[0].run_uri))


def commit(store: Store, run) -> None:
    commits.write_marker(store.inner, f"{run.stage.name}/{OUTPUT}", 1, {}, {}, run.spec_hash)


def remember(seen: dict, before: Seen | None, jobs, now: float, whole: bool) -> Seen:
    return Seen(
        committed=seen["committed"],
        final_committed=seen["final_committed"],
        running=frozenset(j.name for j in jobs if j.finished is None),
        finished=frozenset(j.name for j in jobs if j.finished is not None),
        whole_at=now if whole else before.whole_at,
    )


def test_a_pass_reads_only_what_can_have_changed(run):
    _, runs, store = run
    names = [r.stage.name for r in runs]
    for r in runs[:2]:
        commit(store, r)
    job = ObservedJob(name="scan-j", stage=names[2], spec_hash=runs[2].spec_hash, attempt=1)

    # First pass: every stage, and final/.
    assert read_whole(None, (job,), 0.0)
    seen = storage(store, runs, None, True)
    assert store.markers() == [*names, "final"]
    assert seen["stage"] == names[2] and set(seen["committed"]) == set(names[:2])
    before = remember(seen, None, (job,), 0.0, True)

    # The Job is still running: only its own stage is read again (and its progress).
    store.reads.clear()
    assert not read_whole(before, (job,), 1.0)
    again = storage(store, runs, before, False)
    assert store.markers() == [names[2]]
    assert again["stage"] == names[2] and again["committed"] == seen["committed"]

    # Its stage commits while it runs: seen at once, and the next stage is read.
    commit(store, runs[2])
    store.reads.clear()
    after = storage(store, runs, before, False)
    assert store.markers() == names[2:4]
    assert after["stage"] == names[3]
    before = remember(after, before, (job,), 2.0, False)

    # A trainer quarantines a damaged input (stage 0) and its Job fails: a Job that ended
    # means every stage is read again.
    commits.quarantine(store.inner, f"{names[0]}/{OUTPUT}", "damaged")
    failed = ObservedJob(
        name="scan-j", stage=names[2], spec_hash=runs[2].spec_hash, attempt=1, finished="Failed"
    )
    assert read_whole(before, (failed,), 3.0)
    assert not read_whole(before, (job,), 3.0)
    store.reads.clear()
    whole = storage(store, runs, before, True)
    assert store.markers() == [*names, "final"]
    assert whole["stage"] == names[0] and names[0] not in whole["committed"]

    # A Job that went away without being seen to end counts as ended too.
    assert read_whole(before, (), 3.0)


def test_hand_made_changes_are_seen_within_a_minute(run):
    _, runs, store = run
    names = [r.stage.name for r in runs]
    commit(store, runs[0])
    seen = storage(store, runs, None, True)
    before = remember(seen, None, (), 100.0, True)
    store.inner.delete(f"{names[0]}/{OUTPUT}")  # deleted by hand, no Job involved

    assert not read_whole(before, (), 100.0 + FULL_READ_SECONDS - 1)
    assert storage(store, runs, before, False)["stage"] == names[1]  # not yet seen
    assert read_whole(before, (), 100.0 + FULL_READ_SECONDS)
    assert storage(store, runs, before, True)["stage"] == names[0]


def test_a_changed_stage_spec_is_read_again(run):
    obj, runs, store = run
    names = [r.stage.name for r in runs]
    for r in runs[:4]:
        commit(store, r)
    before = remember(storage(store, runs, None, True), None, (), 0.0, True)

    changed = obj.model_copy(deep=True)
    next(s for s in changed.spec.stages if s.type == "distill").seed += 1
    new_runs = plan(changed)
    assert [r.spec_hash for r in new_runs[:2]] == [r.spec_hash for r in runs[:2]]
    assert new_runs[2].spec_hash != runs[2].spec_hash
    store.reads.clear()
    seen = storage(store, new_runs, before, False)
    assert store.markers() == [names[2]]
    assert seen["stage"] == names[2]


def test_a_finished_run_reads_final_once(run):
    _, runs, store = run
    for r in runs:
        commit(store, r)
    before = remember(storage(store, runs, None, True), None, (), 0.0, True)
    assert not before.final_committed
    commits.write_marker(store.inner, "final", 1, {}, {}, runs[-1].spec_hash)
    store.reads.clear()
    seen = storage(store, runs, before, False)
    assert store.markers() == ["final"] and seen["final_committed"] and seen["stage"] is None
    before = remember(seen, before, (), 1.0, False)
    store.reads.clear()
    storage(store, runs, before, False)
    assert store.reads == []


def test_a_plan_is_made_once_per_spec(tmp_path):
    from amber_operator import handlers

    doc = tiny_resource(str(tmp_path), name="planned")
    doc["metadata"].update(uid="u-1", resourceVersion="1", annotations={"kopf": "a"})
    first = handlers._plan(parse(doc), "u-1")
    # Every status write changes the resourceVersion (and kopf's annotations): same plan.
    doc["metadata"].update(resourceVersion="2", annotations={"kopf": "b"})
    assert handlers._plan(parse(doc), "u-1") is first
    doc["spec"]["stages"][-1]["seed"] = 7
    changed = handlers._plan(parse(doc), "u-1")
    assert changed is not first and changed[-1].spec_hash != first[-1].spec_hash
