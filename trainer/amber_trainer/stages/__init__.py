"""One runner per stage type, in the module named after it: `run(rt) -> Output`, its files
written under rt.workdir/output; the entry point commits them. The stage types are
`amber.stages.STAGE_TYPES`."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module

from amber.commits import FileEntry
from amber.stages import STAGE_TYPES


@dataclass(frozen=True)
class Output:
    """What a runner hands back to the entry point, which commits the stage's output."""

    step: int  # the step the output was made at (a stage's planned steps, or 0)
    metrics: dict  # what the commit marker, the result and the status report
    # Files this rank uploaded into the output folder itself (encode's shards, each rank
    # its own); rank 0's commit marker lists every rank's beside its own folder's.
    uploaded: dict[str, FileEntry] = field(default_factory=dict)


def runner(stage_type: str):
    if stage_type not in STAGE_TYPES:
        raise ValueError(f"stage type {stage_type!r} has no runner here (known: {STAGE_TYPES})")
    return import_module(f"amber_trainer.stages.{stage_type}").run
