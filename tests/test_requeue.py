"""The operator's requeue: one timer for every resource, each due once, the newest ask wins."""

from __future__ import annotations

import threading
import time

from amber_operator.requeue import Requeue


def test_passes_fire_when_due_newest_ask_wins_cancel_holds():
    fired: list[tuple[tuple[str, str], float]] = []
    done = threading.Event()
    start = time.monotonic()

    def fire(key):
        fired.append((key, time.monotonic() - start))
        if key == ("ns", "last"):
            done.set()

    requeue = Requeue(fire)
    requeue.at(("ns", "b"), 0.6)
    requeue.at(("ns", "a"), 0.2)
    requeue.at(("ns", "moved"), 0.1)
    requeue.at(("ns", "moved"), 0.4)  # replaces 0.1: the newest decision knows
    requeue.at(("ns", "gone"), 0.3)
    requeue.cancel(("ns", "gone"))
    requeue.at(("ns", "last"), 0.9)
    assert set(requeue.pending()) == {("ns", k) for k in ("a", "b", "moved", "last")}
    assert done.wait(10)
    time.sleep(0.1)
    assert [k[1] for k, _ in fired] == ["a", "moved", "b", "last"]
    at = {k[1]: t for k, t in fired}
    for name, due in (("a", 0.2), ("moved", 0.4), ("b", 0.6), ("last", 0.9)):
        assert due <= at[name] < due + 0.5, (name, at[name])
    assert requeue.pending() == {}


def test_many_resources_share_one_timer_thread():
    before = threading.active_count()
    fired = []
    requeue = Requeue(fired.append, workers=2)
    for i in range(1000):
        requeue.at(("ns", f"r{i}"), 0.05)
    deadline = time.monotonic() + 10
    while len(fired) < 1000 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(fired) == sorted(("ns", f"r{i}") for i in range(1000))
    assert threading.active_count() - before <= 3  # the timer and the pool, not one each


def test_a_requeued_pass_defers_to_a_live_peer_of_higher_priority():
    from datetime import datetime, timedelta, timezone

    from amber_operator.peering import Peering, outranked

    me = Peering("amber-operator", "me", 100, clusterwide=False)
    now = datetime(2026, 12, 4, 2, 0, tzinfo=timezone.utc)

    def peer(priority, seconds_ago, lifetime=60):
        seen = (now - timedelta(seconds=seconds_ago)).isoformat()
        return {"priority": priority, "lifetime": lifetime, "lastseen": seen}

    assert outranked({"me": peer(100, 1), "other": peer(200, 5)}, me, now)
    assert not outranked({"me": peer(100, 1)}, me, now)  # alone
    assert not outranked({"other": peer(200, 61)}, me, now)  # its lifetime ran out
    assert not outranked({"other": peer(200, 11, lifetime=10)}, me, now)
    assert not outranked({"other": peer(50, 1), "left": None}, me, now)  # lower; one gone


def test_a_pass_runs_in_the_context_of_the_handler_that_asked_for_it():
    import contextvars

    var = contextvars.ContextVar("var")
    seen = []
    done = threading.Event()

    def fire(key):
        seen.append(var.get(None))
        done.set()

    requeue = Requeue(fire)
    var.set("the handler's")  # as kopf sets its settings and event queue for a handler
    requeue.at(("ns", "a"), 0.05)
    var.set("changed later")
    assert done.wait(5)
    assert seen == ["the handler's"]
