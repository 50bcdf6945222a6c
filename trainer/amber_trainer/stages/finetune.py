"""Stage `finetune`: full-parameter flow matching and distillation of the teacher's output."""

from __future__ import annotations

import torch

from amber_trainer import data
from amber_trainer.data import Sampler
from amber_trainer.model.forward import concat, velocity
from amber_trainer.runtime import Runtime
from amber_trainer.stages import Output, inputs, outputs
from amber_trainer.train import checkpoint, loop, targets
from amber_trainer.train.objectives import FlowMatching
from amber_trainer.train.rollouts import Rollouts


def flow_inputs(
    rt, train, sampler, params, teacher, micro_step: int, pool=None, rollouts=None, student=None
):
    """The i-th micro-batch for flow matching: (x_t, target, teacher velocity or None).
    With a target `pool`, the sampler walks its entries and their teacher velocities. With
    `rollouts`, the batch's last `params.on_policy_rows` rows are the `student`'s own
    trajectory states, whose only target is the teacher's velocity there."""
    size = params.micro_batch_size
    own = params.on_policy_rows(size) if rollouts is not None else 0
    rows = sampler.indices(micro_step, rt.rank, rt.world, size)[: size - own]
    parts = []
    if rows:
        parts.append(_data_rows(rt, train, sampler, params, teacher, micro_step, rows, pool))
    if own:
        parts.append(_own_rows(rt, train, teacher, rollouts, student))
    if len(parts) == 1:
        return parts[0]
    x, target, teacher_v = zip(*parts, strict=True)
    return concat(list(x)), torch.cat(target), torch.cat(teacher_v)


def _data_rows(rt, train, sampler, params, teacher, micro_step: int, rows, pool):
    if pool is not None:
        _, x, target = pool.inputs(train, rows, rt.device)
        return x, target, pool.teacher_outputs(rows, (), rt.device)[1]
    gen = sampler.generator(micro_step, rt.rank)
    batch = train.rows(rows, rt.device)
    t = targets.sampling_of(params).draw(len(rows), gen)  # the pool's draw when it has one
    x, target = data.noised(batch, t, gen)
    teacher_v = None
    if teacher is not None:
        with torch.no_grad():
            teacher_v = velocity(teacher, loop.cast(x, rt.device, teacher.dtype))
    return x, target, teacher_v


def own_velocity(rt, student):
    """The student's velocity as its trajectories take their Euler steps."""
    return lambda x: velocity(student, loop.cast(x, rt.device, student.dtype))


@torch.no_grad()
def _own_rows(rt, train, teacher, rollouts: Rollouts, student):
    x = rollouts.draw(own_velocity(rt, student), train, rt.device)
    teacher_v = velocity(teacher, loop.cast(x, rt.device, teacher.dtype)).float()
    return x, teacher_v, teacher_v


def rollouts_for(rt, params, state: dict | None) -> Rollouts | None:
    """The stage's on-policy trajectories (none when onPolicyFraction is 0), resumed from
    the loop state of a checkpoint when it has this rank's."""
    size = params.on_policy_rows(params.micro_batch_size)
    if size == 0:
        return None
    rollouts = Rollouts(size, params.sampler_steps, params.sampler_shift, params.seed, rt.rank)
    saved = (state or {}).get(loop.CARRY)
    if saved is not None and len(saved) == rt.world:
        rollouts.load_state_dict(saved[rt.rank])
    elif saved is not None:  # other ranks, other trajectories: begin them again
        rt.log("on-policy trajectories begin afresh", written=len(saved), world=rt.world)
    return rollouts


def run(rt: Runtime) -> Output:
    params = rt.run.stage
    student, layer_map = inputs.input_model(rt)
    student.train()
    teacher = inputs.teacher(rt) if params.distill_weight > 0 else None
    train, _ = inputs.datasets(rt, dict(student.config))
    pool = inputs.target_pool(rt, teacher, params, (), len(train)) if teacher else None
    sampler = Sampler(len(pool) if pool else len(train), params.seed)
    objective = FlowMatching(student, params.distill_weight, params.flow_weight)
    engine = loop.build_engine(rt, objective, params, params.steps)
    state = checkpoint.resume_state(rt, engine)

    rollouts = rollouts_for(rt, params, state)

    def make_inputs(micro_step):
        return flow_inputs(rt, train, sampler, params, teacher, micro_step, pool, rollouts, student)

    part = loop.Part(params.steps, "finetune")
    state = loop.train(rt, engine, params, make_inputs, part, state, carry=rollouts)
    metrics = {**outputs.training_metrics(state), "flowLoss": [p[0] for p in state["parts"]]}
    outputs.write_output(
        rt, outputs.trained_model(engine, state), layer_map, metrics, "flow-matching loss"
    )
    return Output(params.steps, metrics)
