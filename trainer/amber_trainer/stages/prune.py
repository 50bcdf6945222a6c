"""Stage `prune`: keep the scored layers, one per span, re-initialised as `init` says."""

from __future__ import annotations

import json

from amber_trainer import models
from amber_trainer import prune as pruning
from amber_trainer.runtime import Runtime
from amber_trainer.score import ScoreResult
from amber_trainer.stages import common


def run(rt: Runtime) -> tuple[int, dict]:
    out = rt.workdir / "output"
    out.mkdir()
    metrics: dict = {}
    if rt.is_main:  # cheap tensor arithmetic: one process does it, the others wait
        teacher = common.teacher(rt, frozen=False)
        scored = ScoreResult.from_json(
            (rt.fetch_output(rt.run.score_from) / "importance.json").read_text()
        )
        num_layers = len(teacher.transformer_blocks)
        entries = pruning.layer_map(
            scored.keep, num_layers, rt.run.stage.init, scored.aggregate, scored.spans
        )
        student = pruning.prune(teacher, entries)
        common.save_model(student, out, pruning.entries_to_json(entries))
        metrics = {
            "layers": len(entries),
            "parameters": models.count_parameters(student),
            "teacherParameters": models.count_parameters(teacher),
        }
        (out / "metrics.json").write_text(json.dumps(metrics))
    return 0, metrics
