"""Stage `finetune`: full-parameter flow matching and distillation of the teacher's output."""

from __future__ import annotations

import torch

from amber_trainer import checkpoint, loop, targets
from amber_trainer.data import Sampler
from amber_trainer.forward import velocity
from amber_trainer.objectives import FlowMatching
from amber_trainer.runtime import Runtime
from amber_trainer.stages import common


def flow_inputs(rt, train, sampler, params, teacher, micro_step: int, pool=None):
    """The i-th micro-batch for flow matching: (x_t, target, teacher velocity or None).
    With a target `pool`, the sampler walks its entries and their teacher velocities."""
    gen = sampler.generator(micro_step, rt.rank)
    rows = sampler.indices(micro_step, rt.rank, rt.world, params.micro_batch_size)
    if pool is not None:
        _, x, target = pool.inputs(train, rows, rt.device)
        return x, target, pool.teacher_outputs(rows, (), rt.device)[1]
    batch = train.rows(rows, rt.device)
    t = targets.sampling_of(params).draw(len(rows), gen)  # the pool's draw when it has one
    x, target = common.noised(batch, t, gen)
    teacher_v = None
    if teacher is not None:
        with torch.no_grad():
            teacher_v = velocity(teacher, loop.cast(x, rt.device, teacher.dtype))
    return x, target, teacher_v


def run(rt: Runtime) -> tuple[int, dict]:
    params = rt.run.stage
    student, layer_map = common.input_model(rt)
    student.train()
    teacher = common.teacher(rt) if params.distill_weight > 0 else None
    train, _ = common.datasets(rt, dict(student.config))
    pool = common.target_pool(rt, teacher, params, (), len(train)) if teacher else None
    sampler = Sampler(len(pool) if pool else len(train), params.seed)
    objective = FlowMatching(student, params.distill_weight, params.flow_weight)
    engine = loop.build_engine(rt, objective, params, params.steps)
    resumed = checkpoint.resume(rt, engine)
    state = resumed[1] if resumed else None

    def make_inputs(micro_step):
        return flow_inputs(rt, train, sampler, params, teacher, micro_step, pool)

    state = loop.train(rt, engine, params, make_inputs, params.steps, "finetune", state=state)
    metrics = {**common.training_metrics(state), "flowLoss": [p[0] for p in state["parts"]]}
    common.write_output(
        rt, common.trained_model(engine, state), layer_map, metrics, "flow-matching loss"
    )
    return params.steps, metrics
