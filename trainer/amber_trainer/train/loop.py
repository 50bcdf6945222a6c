"""The training loop every optimising stage uses: DeepSpeed step, checkpoints, progress."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch

from amber.api import DeepSpeedSpec
from amber.stages import TrainingParams
from amber_trainer.model.forward import FlowInputs
from amber_trainer.runtime import Runtime, deepspeed_config, peak_memory_mb
from amber_trainer.train import checkpoint, speed

# make_inputs(micro_step) -> the objective's positional arguments for that micro-batch
InputFn = Callable[[int], tuple]


def cast(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a batch to the engine's device; floating tensors take the training dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype if value.is_floating_point() else None)
    if isinstance(value, FlowInputs):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        moved = {k: cast(v, device, dtype) for k, v in fields.items() if k != "timestep"}
        return FlowInputs(**moved, timestep=value.timestep.to(device))
    if isinstance(value, dict):
        return {k: cast(v, device, dtype) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(cast(v, device, dtype) for v in value)
    return value


def build_engine(rt: Runtime, objective: torch.nn.Module, params: TrainingParams, steps: int):
    return make_engine(objective, rt.run.deepspeed, params, steps, rt.world, rt.device)


def make_engine(
    objective: torch.nn.Module,
    ds: DeepSpeedSpec,
    params: TrainingParams,
    steps: int,
    world: int,
    device: torch.device,
    overrides: dict | None = None,
):
    """The DeepSpeed engine a stage trains `objective` with (benchmarks build the same, and
    try alternatives through `overrides`, merged into the DeepSpeed config)."""
    config = deepspeed_config(ds, params, steps, world, device.type == "cuda")
    for key, value in (overrides or {}).items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    objective.activation_checkpointing = ds.activation_checkpointing
    if speed.should_compile(ds, device, config["zero_optimization"]["stage"]):
        speed.compile_blocks(objective.student)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=objective, model_parameters=trainable, config=config
    )
    return single_process_fast_path(engine, world, config["zero_optimization"]["stage"])


def continue_schedule(engine, steps_before: int) -> None:
    """Put the engine's learning-rate schedule at optimiser step `steps_before` (its config's
    schedule spans the steps before as well): one warm-up for a stage trained in parts."""
    if steps_before > 0:
        engine.lr_scheduler.step(steps_before - 1)


Moments = dict[str, dict[str, Any]]  # parameter name -> its optimizer state (AdamW's)


def optimizer_moments(engine) -> Moments:
    """The optimizer's per-parameter state by parameter name (not copied). Only a plain torch
    optimizer has it whole (no ZeRO partitions or mixed-precision wrappers): otherwise
    none, and whatever is handed these moments starts from zero."""
    optimizer = engine.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        return {}
    return {
        name: optimizer.state[param]
        for name, param in engine.module.named_parameters()
        if param in optimizer.state
    }


@torch.no_grad()
def put_moments(engine, moments: Moments) -> None:
    """Give `engine`'s optimizer a copy of `moments` for every parameter it trains under the
    same name and shape (a plain torch optimizer only, as `optimizer_moments`)."""
    optimizer = engine.optimizer
    if not moments or not isinstance(optimizer, torch.optim.Optimizer):
        return
    for name, param in engine.module.named_parameters():
        state = moments.get(name)
        average = state.get("exp_avg") if state else None
        if average is None or average.shape != param.shape:
            continue
        optimizer.state[param] = {
            k: v.to(param.device).clone() if isinstance(v, torch.Tensor) else v
            for k, v in state.items()
        }


def single_process_fast_path(engine, world: int, zero_stage: int = 0):
    """Alone, there is no one to all-reduce gradients with: skip DeepSpeed's flatten, reduce
    and unflatten copies after every backward. (Not under ZeRO, whose optimizers take their
    gradients from that very reduction.)"""
    if world == 1 and zero_stage == 0:
        engine.enable_backward_allreduce = False
    return engine


CARRY = "carry"


def _carried(rt: Runtime, carry) -> dict:
    return {} if carry is None else {CARRY: rt.gather(carry.state_dict())}


def ema_decay(ema: float, steps_done: int) -> float:
    """The average's decay after `steps_done` steps: warmed up, so that the first steps'
    weights, far from trained, fade out quickly."""
    return min(ema, (1 + steps_done) / (10 + steps_done))


@torch.no_grad()
def update_ema(average: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    for name, param in model.named_parameters():
        average[name].mul_(decay).add_(param.detach().float(), alpha=1 - decay)


@torch.no_grad()
def load_ema(model: torch.nn.Module, average: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Put the moving average's weights into `model` (what the stage then saves)."""
    for name, param in model.named_parameters():
        param.copy_(average[name].to(param.device, param.dtype))
    return model


@dataclass(frozen=True)
class Part:
    """The steps one call of `train` runs: a whole stage, or one part of a stage trained in
    parts (fuse's phases and closing fine-tune), placed in the stage for progress and
    checkpoint numbering."""

    steps: int  # optimiser steps of this part
    label: str = "train"  # names the part in progress records and its checkpoints
    offset: int = 0  # the stage's steps before this part
    stage_steps: int | None = None  # the whole stage's steps (None: this part's)

    @property
    def total(self) -> int:
        return self.stage_steps or self.offset + self.steps


def train(
    rt: Runtime,
    engine,
    params: TrainingParams,
    make_inputs: InputFn,
    part: Part,
    state: dict | None = None,
    carry=None,
) -> dict[str, Any]:
    """Run optimiser steps [state.step, part.steps) with checkpoints; return the loop state.

    The state ({step, losses, parts}, and with `params.ema` the moving average of the
    student's weights) survives in checkpoints, so a resumed run reports the same loss
    curve, and saves the same average, as an uninterrupted one. `carry` (with a
    `state_dict()`) is state that `make_inputs` keeps between micro-batches (the on-policy
    trajectories): checkpoints hold one entry per rank of it under `CARRY`.
    """
    state = state or {"step": 0, "losses": [], "parts": []}
    student = engine.module.student  # an objectives.Objective
    dtype = student.dtype
    total_steps, label, step_offset = part.steps, part.label, part.offset
    if params.ema > 0 and "ema" not in state:
        if engine.zero_optimization_partition_weights():
            raise ValueError("ema: a moving average needs whole weights; not with zeroStage 3")
        state["ema"] = {n: p.detach().float().clone() for n, p in student.named_parameters()}
    accumulation = params.gradient_accumulation
    samples_per_step = params.micro_batch_size * accumulation * rt.world
    started = time.perf_counter()
    first_step = state["step"]
    for step in range(state["step"], total_steps):
        totals = None  # (loss, *parts) summed on the device: no host sync per micro-batch
        for micro in range(accumulation):
            inputs = cast(make_inputs(step * accumulation + micro), rt.device, dtype)
            loss, parts = engine(*inputs)
            engine.backward(loss)
            engine.step()
            values = torch.cat([loss.detach().float()[None], parts.detach().float()])
            totals = values if totals is None else totals + values
        step_loss, *step_parts = (totals / accumulation).tolist()  # the step's one sync
        if params.ema > 0:
            update_ema(state["ema"], student, ema_decay(params.ema, step + 1))
        state["step"] = step + 1
        state["losses"].append(step_loss)
        state["parts"].append(step_parts)
        steps_per_second = (step + 1 - first_step) / max(time.perf_counter() - started, 1e-9)
        rt.progress(
            step_offset + step + 1,
            part.total,
            steps_per_second,
            steps_per_second * samples_per_step,
            phase=label,
            loss=round(step_loss, 6),
        )
        done = step + 1 == total_steps
        if (step + 1) % params.checkpoint_every == 0 and not done:
            checkpoint.save(
                rt,
                engine,
                step_offset + step + 1,
                {"label": label, **state, **_carried(rt, carry)},
                {"loss": step_loss, "label": label},
            )
    state["samples_per_s"] = (
        (total_steps - first_step) * samples_per_step / max(time.perf_counter() - started, 1e-9)
    )
    state["peak_memory_mb"] = peak_memory_mb(rt.device)
    return state
