"""Reconciles asked for at a time (`Decision.requeue_after`: a retry when its backoff ends, a
stalled store looked at again): one timer thread for every resource, and a small pool that
runs the passes, so a thousand resources waiting out their backoffs cost no thread each.

A pass runs in the context (`contextvars`) of the handler that asked for it: kopf keeps its
settings and the object's event queue there, and `kopf.event` needs them."""

from __future__ import annotations

import contextvars
import heapq
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

Key = tuple[str, str]  # namespace, name


class Requeue:
    def __init__(self, fire: Callable[[Key], None], workers: int = 4):
        self._fire = fire
        self._due: dict[Key, tuple[float, contextvars.Context]] = {}  # one time per resource
        self._heap: list[tuple[float, Key]] = []  # with stale entries, skipped when popped
        self._wake = threading.Condition()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="amber-requeue")
        threading.Thread(target=self._loop, name="amber-requeue-timer", daemon=True).start()

    def at(self, key: Key, delay: float) -> None:
        """Reconcile `key` in `delay` seconds; replaces what was asked for it before (the
        newest decision is the one that knows)."""
        due = time.monotonic() + max(0.0, delay)
        with self._wake:
            self._due[key] = (due, contextvars.copy_context())
            heapq.heappush(self._heap, (due, key))
            self._wake.notify()

    def cancel(self, key: Key) -> None:
        with self._wake:
            self._due.pop(key, None)

    def pending(self) -> dict[Key, float]:
        """Seconds until each resource is due (for tests and metrics)."""
        now = time.monotonic()
        with self._wake:
            return {key: due - now for key, (due, _) in self._due.items()}

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._wake.wait(timeout)
                due, key = heapq.heappop(self._heap)
                if self._due.get(key, (None,))[0] != due:
                    continue  # replaced or cancelled since
                _, context = self._due.pop(key)
            self._pool.submit(context.run, self._fire, key).add_done_callback(_report)


def _report(future) -> None:
    """A pass that raised outside its own error handling: said, never swallowed."""
    if future.exception() is not None:
        logging.getLogger(__name__).error("requeued pass failed", exc_info=future.exception())
