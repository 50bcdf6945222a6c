"""Stage `score`: timestep-sensitive importance of every teacher block (forward only)."""

from __future__ import annotations

import json

import torch

from amber_trainer.runtime import Runtime
from amber_trainer.stages import Output, inputs
from amber_trainer.surgery import score


def run(rt: Runtime) -> Output:
    params = rt.run.stage
    teacher = inputs.teacher(rt)
    num_layers = len(teacher.transformer_blocks)
    if params.target_layers >= num_layers:
        raise ValueError(
            f"targetLayers ({params.target_layers}) is not below the teacher's {num_layers} layers"
        )
    train, _ = inputs.datasets(rt, dict(teacher.config))
    count = min(params.calibration_samples, len(train))
    # The seed picks the calibration rows as well as their noise.
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(params.seed))
    rows = rows[:count].tolist()
    # Each process scores its share of the calibration batches; the sums are combined.
    mine = [rows[i : i + params.batch_size] for i in range(0, count, params.batch_size)]
    mine = mine[rt.rank :: rt.world]
    batches = [train.rows(r, rt.device, teacher.dtype) for r in mine]
    rounds = 1 if params.mode == "one-shot" else num_layers - params.target_layers
    if params.criterion in score.PATTERNS:
        rounds = 0  # a fixed pattern reads no data
    total = rounds * len(params.timesteps) * len(batches)
    done = 0

    def tick():
        nonlocal done
        done += 1
        rt.progress(done, total)

    def matrix(removed):
        local = score.MATRICES[params.criterion](
            teacher, batches, params.timesteps, params.seed + rt.rank, removed, on_step=tick
        )
        weight = sum(len(b) for b in batches)
        parts = rt.gather((local * weight, weight))
        return sum(m for m, _ in parts) / max(1, sum(w for _, w in parts))

    result = score.score(teacher, batches, params, matrix_fn=matrix)
    out = rt.workdir / "output"
    out.mkdir()
    (out / "importance.json").write_text(result.to_json())
    metrics = {
        "keep": result.keep,
        "spans": result.spans,
        "criterion": params.criterion,
        "calibrationSamples": count,
    }
    if rt.is_main:
        if params.criterion == "block-influence":
            title = "block influence: 1 - cos(block input, block output)"
            score.heatmap(result, out / "importance.png", title)
        elif params.criterion == "total-effect":
            title = "total effect: velocity error when the block is skipped"
            score.heatmap(result, out / "importance.png", title)
        elif params.criterion == "importance":
            score.heatmap(result, out / "importance.png")
        (out / "metrics.json").write_text(json.dumps(metrics))
    return Output(0, metrics)
