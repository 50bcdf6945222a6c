"""Stage `prune`: keep the scored layers, one per span, re-initialised as `init` says, then
each block's MLP output layers refitted to its span (`refitMlp`)."""

from __future__ import annotations

import json

import torch

from amber_trainer.model import models
from amber_trainer.runtime import Runtime
from amber_trainer.stages import Output, inputs, outputs
from amber_trainer.surgery import prune, spanfit
from amber_trainer.surgery.score import ScoreResult

FIT_BATCH = 16


def run(rt: Runtime) -> Output:
    params = rt.run.stage
    out = rt.workdir / "output"
    out.mkdir()
    metrics: dict = {}
    if rt.is_main:  # tensor arithmetic and a few forwards: one process does it, others wait
        # Both models stay on the host; the refit takes one block at a time to the device.
        teacher = inputs.teacher(rt, frozen=False, device=torch.device("cpu"))
        scored = ScoreResult.from_json(
            (rt.fetch_output(rt.run.score_from) / "importance.json").read_text()
        )
        num_layers = len(teacher.transformer_blocks)
        entries = prune.layer_map(
            scored.keep, num_layers, params.init, scored.aggregate, scored.spans
        )
        student = prune.prune(teacher, entries)
        metrics = {
            "layers": len(entries),
            "parameters": models.count_parameters(student),
            "teacherParameters": models.count_parameters(teacher),
        }
        if params.refit_mlp:
            train, _ = inputs.datasets(rt, dict(teacher.config))
            batches = spanfit.calibration(
                train, params.fit_samples, params.seed, FIT_BATCH, rt.device, teacher.dtype
            )
            spans = [e.span for e in entries]
            errors = spanfit.refit(
                teacher.eval(),
                student.eval(),
                spans,
                batches,
                rt.device,
                on_block=lambda j: rt.progress(j + 1, len(spans)),
            )
            # Per student block, its image stream's relative error against the teacher's
            # after its span, on the refit's rows: before and after the refit.
            metrics["spanError"] = [[round(a, 4), round(b, 4)] for a, b in errors]
            rt.log("refitted the MLPs", error_before=errors[-1][0], error_after=errors[-1][1])
        outputs.save_model(student, out, prune.entries_to_json(entries))
        (out / "metrics.json").write_text(json.dumps(metrics))
    return Output(0, metrics)
