"""One runner per stage type: `run(rt) -> (step, metrics)`, writing rt.workdir/output."""

from __future__ import annotations

from importlib import import_module

RUNNERS = ("encode", "score", "prune", "distill", "finetune", "fuse", "eval")


def runner(stage_type: str):
    if stage_type not in RUNNERS:
        raise ValueError(f"stage type {stage_type!r} has no runner here (known: {RUNNERS})")
    return import_module(f"amber_trainer.stages.{stage_type}").run
