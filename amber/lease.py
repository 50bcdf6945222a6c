"""The run lease: one holder at a time runs a resource's folder.

`amber run` and the operator take `LEASE.json` in the run's folder before they start a stage
and renew it while they work; a second holder is refused with a message naming the first
(or waits, `amber run --wait`). Every write is conditional (`Store.create`, `Store.replace`),
so two holders racing for a free lease cannot both win.

When a lease may be taken over, without trusting two machines' clocks or PIDs:
- released (a holder that ended writes `released`; the file stays, so its fencing token
  keeps counting up);
- its holder is certainly dead: the same boot of the same machine, the same PID namespace,
  and no such process (a host name alone says nothing across containers);
- or this process has seen it unchanged, on its own monotonic clock, for the holder's whole
  `ttl`, as Kubernetes' leader election does: a live holder renews every third of a ttl,
  whatever either clock says. A lease whose `expires` has passed by this machine's clock is
  watched that long before it is taken (or refused); one that has not is refused at once
  unless the caller waits.

Fencing: every holder has a `token`, one more than the holder's before it. The stage
processes of a holder get it (`FENCE_ENV`) and every commit marker records it; a marker is
written only while `LEASE.json` still names that holder, and never over a marker of a
newer token (`amber.commits.write_marker`), so a holder that lost the lease (paused past its
ttl, then resumed) cannot overwrite the new holder's work.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from functools import cache
from pathlib import Path

from pydantic import Field, ValidationError

from amber import layout
from amber.base import Model
from amber.errors import RunLocked
from amber.storage import StorageError, Store

KEY = layout.LEASE
TTL_ENV = "AMBER_LEASE_TTL"  # seconds; tests shorten it, a store slow to write lengthens it
TTL_SECONDS = float(os.environ.get(TTL_ENV) or 60.0)
FENCE_ENV = "AMBER_LEASE_FENCE"  # the holder's Fence, handed to its stage processes


class LeaseLost(RunLocked):
    """This process's holder no longer holds the run's folder: nothing more is committed."""


@cache
def _identity() -> tuple[str, str]:
    """This machine's boot and this process's PID namespace: where a pid means something."""

    def read(how) -> str:
        try:
            return how()
        except OSError:
            return ""

    boot = read(lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    return boot, read(lambda: os.readlink("/proc/self/ns/pid"))


class Holder(Model):
    """Who holds a run's folder (written to LEASE.json)."""

    id: str = Field(..., description="id: this holder's unique id.")
    kind: str = Field(..., description="kind: amber-run or operator.")
    host: str = Field(..., description="host: where it runs (for people).")
    pid: int = Field(..., description="pid: its process, in `pidNamespace`.")
    acquired: float = Field(..., description="acquired: when it took the lease (its clock).")
    expires: float = Field(..., description="expires: unless renewed (its clock, for people).")
    ttl: float = Field(TTL_SECONDS, description="ttl: it renews within this many seconds.")
    boot: str = Field("", description="boot: the machine's boot id.")
    pid_namespace: str = Field("", description="pidNamespace: the namespace `pid` is in.")
    token: int = Field(0, description="token: the fencing token, one more per new holder.")
    released: bool = Field(False, description="released: it let go; free for the next.")

    def describe(self) -> str:
        left = self.expires - time.time()
        return (
            f"{self.kind} pid {self.pid} on {self.host} since "
            f"{time.strftime('%H:%M:%S', time.localtime(self.acquired))} "
            f"(lease expires in {max(0, left):.0f} s)"
        )


class Fence(Model):
    """What a holder's stage processes commit under: its id and token."""

    id: str
    token: int

    def env(self) -> dict[str, str]:
        return {FENCE_ENV: self.model_dump_json()}


def fence_from_env() -> Fence | None:
    text = os.environ.get(FENCE_ENV)
    return Fence.model_validate_json(text) if text else None


def dead_here(holder: Holder) -> bool:
    """True only when certain: the holder's pid is in this boot's, this PID namespace's
    process table, and no such process is there."""
    boot, namespace = _identity()
    if not boot or not namespace or (holder.boot, holder.pid_namespace) != (boot, namespace):
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Watch:
    """How long this process has seen each run folder's lease unchanged, on its monotonic
    clock (one per process: the operator's passes and `acquire`'s polls add to it)."""

    def __init__(self):
        self._seen: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def unchanged_for(self, store: Store, version: str) -> float:
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(store.uri)
            if seen is None or seen[0] != version:
                self._seen[store.uri] = (version, now)
                return 0.0
            return now - seen[1]


WATCH = Watch()


def free(holder: Holder | None, unchanged_for: float) -> bool:
    """Whether a lease may be taken: none, released, its holder dead here, or seen
    unchanged for its whole ttl."""
    return holder is None or holder.released or dead_here(holder) or unchanged_for >= holder.ttl


class Lease:
    """A held lease; `renew` it before `ttl` passes (or `keep` it renewed), `release` it."""

    def __init__(self, store: Store, holder: Holder, version: str, ttl: float):
        self.store, self.holder, self.version, self.ttl = store, holder, version, ttl
        self.lost: str | None = None  # why it is no longer ours
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def fence(self) -> Fence:
        return Fence(id=self.holder.id, token=self.holder.token)

    def _write(self, holder: Holder) -> bool:
        data = holder.model_dump_json(indent=2).encode()
        if self.store.replace(KEY, data, self.version):
            current = self.store.read_versioned(KEY)
            if current is not None and current[0] == data:
                self.holder, self.version = holder, current[1]
                return True
        self.lost = f"{self.store.uri}/{KEY} was taken over by another holder"
        return False

    def renew(self) -> bool:
        if self.lost:
            return False
        return self._write(self.holder.model_copy(update={"expires": time.time() + self.ttl}))

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
        """Raise LeaseLost when the lease was lost (another holder took it over)."""
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost:
            self._write(self.holder.model_copy(update={"released": True, "expires": time.time()}))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, kind, *exc) -> None:
        try:
            self.release()
        except StorageError:
            if kind is None:
                raise
            # The run's own error says more (a disk turned read-only says it twice); the
            # lease, never released, is taken over as its holder's is once it is dead.


def read(store: Store) -> tuple[Holder | None, str | None]:
    """The lease's holder and version; an unreadable lease is one no live holder renews
    (taken over once seen unchanged for a default ttl)."""
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
    RunLocked naming the holder when it does not. A lease that looks expired by this
    machine's clock is watched for its holder's ttl first (taken if it never changes)."""
    deadline = time.monotonic() + wait
    me = uuid.uuid4().hex
    waited = False
    watching = None  # when this call first saw a lease that looked expired
    while True:
        current, version = read(store)
        holder = _this_process(me, kind, ttl, token=_next_token(current))
        data = _claim(store, holder, current, version)
        if data is not None:
            latest = store.read_versioned(KEY)
            if latest is not None and latest[0] == data:
                return Lease(store, holder, latest[1], ttl)
            continue
        current, version = read(store)
        if current is None or current.released:
            continue  # released between the two reads
        limit = deadline
        if time.time() > current.expires:  # probably dead: confirm on our own clock
            watching = watching or time.monotonic()
            limit = max(deadline, watching + current.ttl + min(poll, current.ttl / 4))
        if time.monotonic() >= limit:
            raise RunLocked(
                f"{store.uri} is being run by {current.describe()}; wait for it, stop it, "
                "or run with --wait"
            )
        if not waited:
            on_wait(current)
            waited = True
        time.sleep(min(poll, current.ttl / 4))


def hold(store: Store, holder_id: str, kind: str, ttl: float = TTL_SECONDS) -> Holder | None:
    """Take or renew the lease for a holder whose `holder_id` outlives its process (the
    operator: one id per resource, so a restarted operator keeps its leases). None when it
    is ours now; else the other, live holder. A lease of ours with more than two thirds of
    `ttl` left is not written again: a burst of passes costs one read each. Another
    holder's lease is taken once free (`free`: this process's passes watch it)."""
    current, version = read(store)
    ours = current is not None and current.id == holder_id and not current.released
    if ours and current.expires - time.time() > ttl * 2 / 3:
        return None  # renewed within the last third of a ttl: nothing to write yet
    token = current.token if ours else _next_token(current)
    mine = _this_process(holder_id, kind, ttl, current.acquired if ours else None, token)
    if _claim(store, mine, current, version) is not None:
        return None
    current, _ = read(store)
    if current is None or current.released or current.id == holder_id:
        return None
    return current


def let_go(store: Store, holder_id: str) -> None:
    """Release a `hold` (nothing when another holder has the lease)."""
    holder, version = read(store)
    if holder is not None and holder.id == holder_id and not holder.released:
        released = holder.model_copy(update={"released": True, "expires": time.time()})
        store.replace(KEY, released.model_dump_json(indent=2).encode(), version)


def _next_token(current: Holder | None) -> int:
    return (current.token if current is not None else 0) + 1


def _this_process(
    holder_id: str, kind: str, ttl: float, acquired: float | None = None, token: int = 1
) -> Holder:
    now = time.time()
    boot, namespace = _identity()
    return Holder(
        id=holder_id,
        kind=kind,
        host=socket.gethostname(),
        pid=os.getpid(),
        acquired=acquired or now,
        expires=now + ttl,
        ttl=ttl,
        boot=boot,
        pid_namespace=namespace,
        token=token,
    )


def _claim(store: Store, mine: Holder, current: Holder | None, version) -> bytes | None:
    """Write the lease as `mine` where no lease is, over a free one or over our own, with a
    conditional write; the bytes written, or None when it was not."""
    data = mine.model_dump_json(indent=2).encode()
    if current is None:
        written = store.create(KEY, data)
    elif current.id == mine.id or free(current, WATCH.unchanged_for(store, version)):
        written = store.replace(KEY, data, version)
    else:
        written = False
    return data if written else None
