"""Cross-stage rules of a pipeline: what each stage needs from the stages before it.

Per-field checks live on the stage models; these are the ones that need the whole list and
the teacher's depth. The same function backs admission (CRD validation through `amber.api`)
and `amber run`, so a bad recipe is refused before any GPU time is spent.
"""

from __future__ import annotations

from collections.abc import Sequence

from amber.stages import FuseStage, ScoreStage, StageBase

NEEDS_STUDENT = ("distill", "finetune", "fuse")


def check_pipeline(stages: Sequence[StageBase], teacher_layers: int) -> list[str]:
    """Every problem with `stages` as `stages[i].field: reason` lines (empty when valid)."""
    problems: list[str] = []
    seen: set[str] = set()
    student_layers: int | None = None  # depth of the student built so far
    scored = False
    pending_layers: int | None = None
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if stage.name in seen:
            problems.append(f"{where}.name: {stage.name!r} is used by an earlier stage")
        seen.add(stage.name)
        if stage.type == "encode" and i != 0:
            problems.append(f"{where}: encode must be the first stage")
        if isinstance(stage, ScoreStage):
            if stage.target_layers >= teacher_layers:
                problems.append(
                    f"{where}.targetLayers: {stage.target_layers} is not below the teacher's "
                    f"{teacher_layers} layers"
                )
            if stage.keep_first + stage.keep_last > teacher_layers:
                problems.append(f"{where}: keepFirst + keepLast exceeds the teacher's layers")
            scored = True
            pending_layers = stage.target_layers
        if stage.type == "prune":
            if not scored:
                problems.append(f"{where}: prune needs a score stage before it")
            else:
                student_layers = pending_layers
        if stage.type in NEEDS_STUDENT and student_layers is None:
            problems.append(f"{where}: {stage.type} needs a prune stage before it")
        fusing = student_layers is not None and isinstance(stage, FuseStage)
        if fusing and stage.single_layers > student_layers:
            problems.append(
                f"{where}.singleLayers: {stage.single_layers} exceeds the student's "
                f"{student_layers} layers"
            )
    return problems


def student_layers(stages: Sequence[StageBase]) -> int | None:
    """Depth of the final student, or None when the pipeline prunes nothing."""
    depth = None
    for stage in stages:
        if isinstance(stage, ScoreStage):
            depth = stage.target_layers
    return depth
