"""One runner per stage type, in the module named after it: `run(rt) -> (step, metrics)`,
writing rt.workdir/output. The stage types are `amber.stages.STAGE_TYPES`."""

from __future__ import annotations

from importlib import import_module

from amber.stages import STAGE_TYPES


def runner(stage_type: str):
    if stage_type not in STAGE_TYPES:
        raise ValueError(f"stage type {stage_type!r} has no runner here (known: {STAGE_TYPES})")
    return import_module(f"amber_trainer.stages.{stage_type}").run
