"""The student's lineage through a pipeline, walked once: where each stage's model, score and
training data come from, and the shape of the student it starts from. The planner, the
pipeline rules, the cost model and publishing all read this walk."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from amber.stages import StageBase, Student


@dataclass(frozen=True)
class Link:
    """One stage in its pipeline, with what it reads from the stages before it."""

    index: int
    stage: StageBase
    model_from: str | None  # the last model-making stage before it
    score_from: str | None  # the last score stage before it, for a stage that reads one
    data_from: str | None  # the stage that wrote the training data, for every later stage
    models_before: tuple[str, ...]  # every model-making stage before it, for a judge
    student: Student  # the model it starts from (layers None: none pruned yet)
    scored: int | None  # the depth the last score stage before it chose


def walk(stages: Sequence[StageBase]) -> list[Link]:
    links: list[Link] = []
    models: list[str] = []
    score: str | None = None
    data: str | None = None
    student, scored = Student(), None
    for index, stage in enumerate(stages):
        links.append(
            Link(
                index=index,
                stage=stage,
                model_from=models[-1] if models else None,
                score_from=score if stage.reads_score else None,
                data_from=None if stage.makes_data else data,
                models_before=tuple(models) if stage.judges_models else (),
                student=student,
                scored=scored,
            )
        )
        student = stage.student_after(student, scored)
        if stage.makes_model:
            models.append(stage.name)
        if stage.makes_score:
            score, scored = stage.name, stage.target_layers
        if stage.makes_data:
            data = stage.name
    return links


def final_student(stages: Sequence[StageBase]) -> Student:
    """The shape of the model the whole pipeline makes."""
    if not stages:
        return Student()
    last = walk(stages)[-1]
    return last.stage.student_after(last.student, last.scored)
