"""A run's history: one JSON line per stage per `amber run` invocation (reused, ran,
resumed), with its time; for people, for the run report and for tests.

The history is a record, never an input: a line that does not parse (a write cut short, a
hand edit) is skipped with a warning, and the next line is appended after it, on a line of
its own.
"""

from __future__ import annotations

import json
import time
import warnings

from amber import layout
from amber.storage import Store

KEY = layout.HISTORY


def record(store: Store, entry: dict) -> None:
    previous = _text(store)
    if previous and not previous.endswith("\n"):
        previous += "\n"  # a last line cut short stays alone, skipped when read
    store.write_text(KEY, previous + json.dumps({"time": time.time(), **entry}) + "\n")


def entries(store: Store) -> list[dict]:
    found, skipped = [], 0
    for line in _text(store).splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            found.append(entry)
        else:
            skipped += 1
    if skipped:
        warnings.warn(f"{store.uri}/{KEY}: {skipped} damaged line(s) skipped", stacklevel=2)
    return found


def _text(store: Store) -> str:
    if not store.exists(KEY):
        return ""
    return store.read_bytes(KEY).decode(errors="replace")
