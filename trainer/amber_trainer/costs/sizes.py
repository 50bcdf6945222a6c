"""Sizes of the models a recipe produces, from meta-device models (no weights, no memory)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from amber import lineage
from amber.stages import StageBase
from amber_trainer.model import models
from amber_trainer.surgery import fuse


def _row(name: str, config: dict[str, Any]) -> dict[str, Any]:
    model = models.build_empty(config)
    kinds = models.block_kinds(model)
    return {
        "model": name,
        "dual_blocks": kinds.count("dual"),
        "single_blocks": kinds.count("single"),
        "parameters": models.count_parameters(model),
    }


def recipe_sizes(teacher: dict[str, Any], stages: Sequence[StageBase]) -> list[dict[str, Any]]:
    """One row for the teacher, then one for each stage that changes the architecture."""
    rows = [_row("teacher", teacher)]
    config = dict(teacher)
    for link in lineage.walk(stages):
        stage, before = link.stage, link.student
        after = stage.student_after(before, link.scored)
        if after.layers != before.layers:
            config = {**config, "num_layers": after.layers}
            rows.append(_row(f"{stage.name} ({after.layers} layers)", config))
        elif after.single_layers != before.single_layers:
            config = fuse.fused_config(config, stage)
            rows.append(_row(f"{stage.name} ({after.single_layers} single-stream)", config))
    return rows
