"""A run's history: one JSON line per stage per `amber run` invocation (reused, ran,
resumed), with its time; for people, for the run report and for tests."""

from __future__ import annotations

import json
import time

from amber.storage import Store

KEY = "history.jsonl"


def record(store: Store, entry: dict) -> None:
    previous = store.read_text(KEY) if store.exists(KEY) else ""
    store.write_text(KEY, previous + json.dumps({"time": time.time(), **entry}) + "\n")


def entries(store: Store) -> list[dict]:
    if not store.exists(KEY):
        return []
    return [json.loads(line) for line in store.read_text(KEY).splitlines() if line.strip()]
