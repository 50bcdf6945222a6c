"""Cross-stage rules of a pipeline: what each stage needs from the stages before it.

Per-field checks live on the stage models, and the rules a stage type has against its input
student in its own `problems`; these are the ones every stage shares. The same function
backs admission (CRD validation through `amber.api`) and `amber run`, so a bad recipe is
refused before any GPU time is spent.
"""

from __future__ import annotations

from collections.abc import Sequence

from amber import layout, lineage
from amber.stages import StageBase


def check_pipeline(stages: Sequence[StageBase], teacher_layers: int) -> list[str]:
    """Every problem with `stages` as `stages[i].field: reason` lines (empty when valid)."""
    problems: list[str] = []
    seen: set[str] = set()
    for link in lineage.walk(stages):
        stage, where = link.stage, f"stages[{link.index}]"
        if stage.name in seen:
            problems.append(f"{where}.name: {stage.name!r} is used by an earlier stage")
        seen.add(stage.name)
        if stage.name in layout.ENTRIES:
            problems.append(
                f"{where}.name: {stage.name!r} is reserved (the run folder's own "
                f"{stage.name}/ is there); name the stage otherwise"
            )
        if stage.makes_data and link.index != 0:
            problems.append(f"{where}: {stage.type} must be the first stage")
        if stage.reads_score and link.scored is None:
            problems.append(f"{where}: {stage.type} needs a score stage before it")
        if stage.needs_student and link.student.layers is None:
            problems.append(f"{where}: {stage.type} needs a prune stage before it")
        problems += [where + line for line in stage.problems(link.student, teacher_layers)]
    return problems
