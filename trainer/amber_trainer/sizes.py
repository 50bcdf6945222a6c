"""Sizes of the models a recipe produces, from meta-device models (no weights, no memory)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from amber.stages import FuseStage, ScoreStage, StageBase
from amber_trainer import fuse as fusing
from amber_trainer import models


def human(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


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
    target = None
    for stage in stages:
        if isinstance(stage, ScoreStage):
            target = stage.target_layers
        elif stage.type == "prune" and target is not None:
            config = {**config, "num_layers": target}
            rows.append(_row(f"{stage.name} ({target} layers)", config))
        elif isinstance(stage, FuseStage):
            config = fusing.fused_config(config, stage)
            rows.append(_row(f"{stage.name} ({stage.single_layers} single-stream)", config))
    return rows
