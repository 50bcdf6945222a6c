"""Which state a stage is in, read from storage: the one answer `amber run`, the operator and
the trainer's entry point share, and the one policy for what another spec left behind.

- committed: its output is committed and whole under the current spec hash; the stage is
  done, whoever ran it;
- stale: an output committed under another spec (the stage's parameters or an input changed):
  never trusted, and removed, with that spec's checkpoints, when the stage next runs;
- in progress: no current output, but a committed checkpoint or a progress record of the
  current spec; a run resumes from that checkpoint;
- absent: none of these.

A damaged output counts as absent; a reader that may write (`repair`) quarantines it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

from amber import commits
from amber.plan import OUTPUT, StageRun
from amber.records import ProgressRecord
from amber.storage import Store

PROGRESS = "progress.json"

Kind = Literal["committed", "stale", "in progress", "absent"]


@dataclass(frozen=True)
class StageState:
    kind: Kind
    output: commits.Manifest | None = None  # the committed output, current or stale
    checkpoint: int | None = None  # step of the newest whole checkpoint of the current spec
    progress: ProgressRecord | None = None  # the current spec's progress record

    @property
    def committed(self) -> bool:
        return self.kind == "committed"


def progress_key(stage: str) -> str:
    return f"{stage}/{PROGRESS}"


def read(
    store: Store,
    run: StageRun,
    log=print,
    checksums: bool | None = None,
    repair: bool = True,
    detail: bool = True,
) -> StageState:
    """The state of `run`'s stage. Without `detail` a stage that is not committed is only
    told apart as stale or absent (its checkpoints and progress are not read)."""
    name = run.stage.name
    output = commits.read_output(store, f"{name}/{OUTPUT}", log, checksums, repair)
    if output is not None and output.spec_hash == run.spec_hash:
        return StageState("committed", output)
    left = "stale" if output is not None else "absent"
    if not detail:
        return StageState(left, output)
    latest = commits.latest_checkpoint(store, name, run.spec_hash, log, repair)
    progress = None
    if store.exists(progress_key(name)):
        with contextlib.suppress(ValueError):  # a torn record: read again next time
            record = ProgressRecord.model_validate_json(store.read_text(progress_key(name)))
            progress = record if record.spec_hash == run.spec_hash else None
    if latest is None and progress is None:
        return StageState(left, output)
    checkpoint = latest.step if latest is not None else None
    return StageState("in progress", output, checkpoint, progress)


def clear_stale(store: Store, run: StageRun, log=print) -> list[str]:
    """Remove what another spec left in the stage's folder (its output and checkpoints) before
    the current spec runs: a stale output must never be mistaken for this one, and checkpoint
    retention keeps the newest steps whichever spec wrote them, so another spec's later steps
    would otherwise push this one's checkpoints out. Returns the folders removed."""
    name = run.stage.name
    folders = [f"{name}/{OUTPUT}"] + [
        key.removesuffix(f"/{commits.MARKER}")
        for key in store.list(f"{name}/{commits.CHECKPOINTS}")
        if key.endswith(f"/{commits.MARKER}")
    ]
    removed = []
    for folder in folders:
        try:
            manifest = commits.read_manifest(store, folder)
        except commits.CorruptCommit:
            continue  # quarantined by whoever reads it as an input
        if manifest is None or manifest.spec_hash == run.spec_hash:
            continue
        store.delete(f"{folder}/{commits.MARKER}")  # first: a crash leaves a partial folder
        store.delete(folder)
        removed.append(folder)
    if removed:
        log(f"removed {', '.join(removed)}: committed under another spec of stage {name}")
    return removed
