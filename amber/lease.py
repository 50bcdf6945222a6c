"""The run lease: one holder at a time runs a resource's folder.

`amber run` and the operator take `LEASE.json` in the run's folder before they start a stage
and renew it while they work; a second holder is refused with a message naming the first
(or waits, `amber run --wait`). A lease whose holder stopped renewing it (`expires` passed)
or whose process is gone (same host, no such pid) is stale and taken over. Every write is
conditional (`Store.create`, `Store.replace`), so two holders racing for a stale lease cannot
both win.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from pydantic import Field, ValidationError

from amber import layout
from amber.base import Model
from amber.errors import RunLocked
from amber.storage import Store

KEY = layout.LEASE
TTL_SECONDS = 60.0


class Holder(Model):
    """Who holds a run's folder, and until when (written to LEASE.json)."""

    id: str = Field(..., description="id: this holder's unique id.")
    kind: str = Field(..., description="kind: amber-run or operator.")
    host: str = Field(..., description="host: where it runs.")
    pid: int = Field(..., description="pid: its process.")
    acquired: float = Field(..., description="acquired: when it took the lease (epoch s).")
    expires: float = Field(..., description="expires: unless renewed before (epoch s).")

    def describe(self) -> str:
        left = self.expires - time.time()
        return (
            f"{self.kind} pid {self.pid} on {self.host} since "
            f"{time.strftime('%H:%M:%S', time.localtime(self.acquired))} "
            f"(lease expires in {max(0, left):.0f} s)"
        )


def _alive(holder: Holder) -> bool:
    """False only when certain: the holder's host is this one and its process is gone."""
    if holder.host != socket.gethostname():
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale(holder: Holder, now: float | None = None) -> bool:
    return (now or time.time()) > holder.expires or not _alive(holder)


class Lease:
    """A held lease; `renew` it before `ttl` passes (or `keep` it renewed), `release` it."""

    def __init__(self, store: Store, holder: Holder, version: str, ttl: float):
        self.store, self.holder, self.version, self.ttl = store, holder, version, ttl
        self.lost: str | None = None  # why it is no longer ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def renew(self) -> bool:
        if self.lost:
            return False
        now = time.time()
        renewed = self.holder.model_copy(update={"expires": now + self.ttl})
        data = renewed.model_dump_json(indent=2).encode()
        if self.store.replace(KEY, data, self.version):
            current = self.store.read_versioned(KEY)
            if current is not None and current[0] == data:
                self.holder, self.version = renewed, current[1]
                return True
        self.lost = f"{self.store.uri}/{KEY} was taken over by another holder"
        return False

    def keep(self) -> Lease:
        """Renew in a background thread every third of the ttl until `release`."""

        def loop():
            while not self._stop.wait(self.ttl / 3):
                try:
                    if not self.renew():
                        return
                except Exception:  # a store outage: try again at the next tick
                    continue

        self._thread = threading.Thread(target=loop, name="amber-lease", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise RunLocked when the lease was lost (another holder took it over)."""
        if self.lost:
            raise RunLocked(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost:
            return
        current = self.store.read_versioned(KEY)
        if current is not None and current[1] == self.version:
            self.store.delete(KEY)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read(store: Store) -> tuple[Holder | None, str | None]:
    """The lease's holder and version; an unreadable lease counts as a stale one."""
    current = store.read_versioned(KEY)
    if current is None:
        return None, None
    try:
        return Holder.model_validate_json(current[0]), current[1]
    except (ValidationError, ValueError):
        return Holder(id="unreadable", kind="?", host="?", pid=0, acquired=0, expires=0), current[1]


def acquire(
    store: Store,
    kind: str,
    ttl: float = TTL_SECONDS,
    wait: float = 0.0,
    poll: float = 2.0,
    on_wait=lambda holder: None,
) -> Lease:
    """Take the run's lease, waiting up to `wait` seconds for a live holder to let go;
    RunLocked naming the holder when it does not."""
    deadline = time.monotonic() + wait
    me = uuid.uuid4().hex
    waited = False
    while True:
        current, version = read(store)
        holder = _this_process(me, kind, ttl)
        data = _claim(store, holder, current, version)
        if data is not None:
            latest = store.read_versioned(KEY)
            if latest is not None and latest[0] == data:
                return Lease(store, holder, latest[1], ttl)
            continue
        current, _ = read(store)
        if current is None:
            continue  # released between the two reads
        if time.monotonic() >= deadline:
            raise RunLocked(
                f"{store.uri} is being run by {current.describe()}; wait for it, stop it, "
                "or run with --wait"
            )
        if not waited:
            on_wait(current)
            waited = True
        time.sleep(poll)


def hold(store: Store, holder_id: str, kind: str, ttl: float = TTL_SECONDS) -> Holder | None:
    """Take or renew the lease for a holder whose `holder_id` outlives its process (the
    operator: one id per resource, so a restarted operator keeps its leases). None when it
    is ours now; else the other, live holder. A lease of ours with more than two thirds of
    `ttl` left is not written again: a burst of passes costs one read each."""
    current, version = read(store)
    ours = current is not None and current.id == holder_id
    if ours and current.expires - time.time() > ttl * 2 / 3:
        return None  # renewed within the last third of a ttl: nothing to write yet
    mine = _this_process(holder_id, kind, ttl, current.acquired if ours else None)
    if _claim(store, mine, current, version) is not None:
        return None
    current, _ = read(store)
    return None if current is None or current.id == holder_id else current


def let_go(store: Store, holder_id: str) -> None:
    """Release a `hold` (nothing when another holder has the lease)."""
    holder, _ = read(store)
    if holder is not None and holder.id == holder_id:
        store.delete(KEY)


def _this_process(holder_id: str, kind: str, ttl: float, acquired: float | None = None) -> Holder:
    now = time.time()
    return Holder(
        id=holder_id,
        kind=kind,
        host=socket.gethostname(),
        pid=os.getpid(),
        acquired=acquired or now,
        expires=now + ttl,
    )


def _claim(store: Store, mine: Holder, current: Holder | None, version) -> bytes | None:
    """Write the lease as `mine` where no lease is, over a stale one or over our own, with a
    conditional write; the bytes written, or None when it was not."""
    data = mine.model_dump_json(indent=2).encode()
    if current is None:
        written = store.create(KEY, data)
    elif current.id == mine.id or stale(current):
        written = store.replace(KEY, data, version)
    else:
        written = False
    return data if written else None
