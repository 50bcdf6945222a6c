"""The names a run's folder (`{storage.uri}/{namespace}/{name}/`) holds beside its stages'
folders, in one place: the modules that write them import their names from here, and the
validator refuses a stage whose folder would land on one of them."""

from __future__ import annotations

FINAL = "final"  # the published model (amber.publish)
QUARANTINE = "quarantine"  # damaged commits moved aside (amber.commits)
REPORT = "report.html"  # the run report page (amber.report)
RESOURCE = "resource.json"  # the resource the report was written from (amber.report)
HISTORY = "history.jsonl"  # one line per stage per run (amber.history)
LEASE = "LEASE.json"  # who holds the folder (amber.lease)

ENTRIES = (FINAL, QUARANTINE, REPORT, RESOURCE, HISTORY, LEASE)
