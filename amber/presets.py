"""Named recipes, scaled to the teacher's depth (docs/design.md, "The method").

`amber-10b` halves the depth (60 -> 30 for Qwen-Image) and recovers the student by
fine-tuning dominated by the teacher's output. `amber-6b`
continues with the hybrid-stream conversion of the deepest 90% of the student (27 of 30),
each single-stream block with a text correction of half the width. The same preset on a
12-layer tiny teacher gives 6 layers and 5 single-stream blocks. Step counts are sized for
the real model; shorten them with `overrides` for tiny runs.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from amber.stages import Stage

PRESETS = ("amber-10b", "amber-6b")
# What the presets' model stages deliver, as the docs, the run summary and the benchmark name
# them: prune's model before any training, amber-10b's result, amber-6b's result.
MODEL_NAMES = {"prune": "pruned", "finetune": "10B-style", "fuse": "6B-style"}
_STAGE = TypeAdapter(Stage)


ON_POLICY_FRACTION = 0.5


def amber_10b(teacher_layers: int) -> list[dict[str, Any]]:
    student = max(1, teacher_layers // 2)
    return [
        # Direct-effect importance, partitioned into contiguous spans of at most 4 blocks,
        # weighted over timesteps as the flow-matching scheduler's shifted schedule uses
        # them (docs/design.md, "score").
        {
            "type": "score",
            "targetLayers": student,
            "calibrationSamples": 256,
            "sampler": "shifted",
        },
        {"type": "prune", "init": "representative"},
        # Global training dominated by the teacher's output, with a moving average. No
        # layer-wise warm start before it: on the benchmark, giving its steps to this stage
        # scores higher (docs/quality.md); `warm_start` is that stage, for a recipe that
        # wants one.
        # Half of every batch from the student's own sampling trajectories, distilled
        # against the teacher's velocity there (docs/design.md, "finetune").
        {
            "type": "finetune",
            "steps": 12000,
            "learningRate": 1e-5,
            "distillWeight": 0.9,
            "flowWeight": 0.1,
            "ema": 0.999,
            "onPolicyFraction": ON_POLICY_FRACTION,
        },
        {"type": "eval"},
    ]


def warm_start() -> dict[str, Any]:
    """A local layer-wise distillation of the student blocks that stand for several teacher
    blocks, to put before finetune in `spec.stages` (the first presets had it)."""
    return {"type": "distill", "mode": "local", "steps": 2000, "learningRate": 2e-5}


# The paper's hybrid makes the deepest 80% of the student single-stream (24 of 30 blocks),
# one projection serving both streams. amber-6b makes 90% single-stream (27 of 30) and spends
# what that saves on each single block's text correction of half the width: the same size
# (6.16B at full scale), 14 points more on the benchmark (docs/quality.md).
PAPER_SINGLE_SHARE = 0.8
SINGLE_SHARE = 0.9
TEXT_RANK_FRACTION = 0.5


def single_layers(teacher_layers: int, share: float = SINGLE_SHARE) -> int:
    """Single-stream blocks of the hybrid made from the half-depth student."""
    return max(1, round(max(1, teacher_layers // 2) * share))


def amber_6b(teacher_layers: int) -> list[dict[str, Any]]:
    single = single_layers(teacher_layers)
    stages = amber_10b(teacher_layers)
    fuse = {
        "type": "fuse",
        "singleLayers": single,
        "textRankFraction": TEXT_RANK_FRACTION,
        # One phase: on the benchmark, fusing every block at once with a fitted init beats
        # four phases of a quarter each at equal steps (docs/quality.md).
        "blocksPerPhase": single,
        "steps": 4000,
        "learningRate": 1e-5,
        "finetuneSteps": 2000,
        "distillWeight": 0.9,
        "flowWeight": 0.1,
        "ema": 0.999,
        "onPolicyFraction": ON_POLICY_FRACTION,
    }
    return [*stages[:-1], fuse, stages[-1]]


_RECIPES = {"amber-10b": amber_10b, "amber-6b": amber_6b}


def _reasons(name: str, err: ValidationError) -> str:
    return "; ".join(
        f"overrides.{'.'.join([name, *(str(p) for p in e['loc'][1:])])}: "
        + e["msg"].removeprefix("Value error, ")
        for e in err.errors()
    )


def build(
    preset: str, teacher_layers: int, overrides: dict[str, dict[str, Any]], encode: bool = False
) -> list[Stage]:
    """The preset's stages with `overrides` (stage name -> fields) applied and validated;
    `encode` puts an encode stage first (raw pairs in data.uri, nothing encoded yet)."""
    raw = ([{"type": "encode"}] if encode else []) + _RECIPES[preset](teacher_layers)
    by_name = {stage.get("name", stage["type"]): stage for stage in raw}
    unknown = sorted(set(overrides) - set(by_name))
    if unknown:
        raise ValueError(
            f"overrides: no stage named {', '.join(unknown)} in preset {preset} "
            f"(stages: {', '.join(by_name)})"
        )
    stages = []
    for name, fields in by_name.items():
        try:
            stages.append(_STAGE.validate_python({**fields, **overrides.get(name, {})}))
        except ValidationError as err:
            raise ValueError(_reasons(name, err)) from None
    return stages
