"""Stage `distill`: layer-wise distillation of the pruned student from the frozen teacher."""

from __future__ import annotations

import torch

from amber_trainer import data
from amber_trainer.data import Sampler
from amber_trainer.runtime import Runtime
from amber_trainer.stages import Output, inputs, outputs
from amber_trainer.train import checkpoint, loop
from amber_trainer.train.objectives import LayerwiseDistillation, teacher_states


def run(rt: Runtime) -> Output:
    params = rt.run.stage
    teacher = inputs.teacher(rt)
    student, layer_map = inputs.input_model(rt)
    if layer_map is None:
        raise ValueError(f"{rt.run.model_from} output has no layer map: distill follows prune")
    student.train()
    objective = LayerwiseDistillation(
        student,
        [e["span"] for e in layer_map],
        params.mode,
        params.output_loss_weight,
        params.feature_loss,
        params.outlier_sigma,
    )
    boundaries = objective.boundaries()
    train, _ = inputs.datasets(rt, dict(teacher.config))
    pool = inputs.target_pool(rt, teacher, params, boundaries, len(train))
    sampler = Sampler(len(pool) if pool else len(train), params.seed)

    def make_inputs(micro_step: int):
        gen = sampler.generator(micro_step, rt.rank)
        rows = sampler.indices(micro_step, rt.rank, rt.world, params.micro_batch_size)
        if pool is not None:  # the same inputs and teacher answers, read instead of computed
            _, x, _ = pool.inputs(train, rows, rt.device)
            return (x, *pool.teacher_outputs(rows, boundaries, rt.device))
        batch = train.rows(rows, rt.device)
        t = torch.rand(len(rows), generator=gen)  # distillation covers the whole schedule
        x, _ = data.noised(batch, t, gen)
        states, velocity = teacher_states(
            teacher, loop.cast(x, rt.device, teacher.dtype), boundaries
        )
        return x, states, velocity

    engine = loop.build_engine(rt, objective, params, params.steps)
    state = checkpoint.resume_state(rt, engine)
    part = loop.Part(params.steps, "distill")
    state = loop.train(rt, engine, params, make_inputs, part, state)

    per_block = state["parts"]
    metrics = {
        **outputs.training_metrics(state),
        "blockLossFirst": per_block[0],
        "blockLossFinal": per_block[-1],
    }
    outputs.write_output(
        rt, outputs.trained_model(engine, state), layer_map, metrics, "layer-wise loss"
    )
    return Output(params.steps, metrics)
