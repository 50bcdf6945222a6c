"""Stage `fuse`: progressive hybrid-stream conversion, then a short fine-tune.

Phase p converts the next `blocksPerPhase` dual-stream blocks (deepest first) into
single-stream ones (`projectionInit: sequential`: their q, k, v fitted to both streams on
the converted model's own inputs, `fuse.convert`)
and distils the new model block by block and on the output against one
fixed target, the stage's input model (`target: input`; `previous` distils against the
last phase's model instead, so errors chain), on noised training rows and, with
`onPolicyFraction`, on the converted model's own sampling states (`rollouts`). With
`phaseOptimizer: shared` the phases and the fine-tune follow one warm-up and decay schedule
and carry AdamW's moments from phase to phase. The fine-tune after the last phase distils
the frozen teacher's output (`distillWeight`) beside flow matching (`flowWeight`), on the
same mix of rows.

Each phase's model is committed under `{stage}/phases/phase-P/` with the loss history so
far and the optimizer's moments the next part starts from, so a restart resumes inside the
phase it stopped in (or at the start of the next part), against the right target, with the
same moments, and ends with the same model and history as an uninterrupted run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from amber import commits
from amber.stages import FuseStage
from amber_trainer import data
from amber_trainer.data import Sampler
from amber_trainer.model import models
from amber_trainer.model.forward import concat
from amber_trainer.runtime import Runtime
from amber_trainer.stages import Output, inputs, outputs
from amber_trainer.stages.finetune import flow_inputs, own_velocity, rollouts_for
from amber_trainer.surgery import fuse, spanfit
from amber_trainer.train import checkpoint, loop
from amber_trainer.train.objectives import FlowMatching, LayerwiseDistillation, teacher_states

HISTORY = "history.json"
MOMENTS = "moments.pt"  # a phase's optimizer moments by parameter name (plain AdamW only)


def phase_folder(rt: Runtime, phase: int) -> str:
    return f"{rt.stage}/phases/phase-{phase}"


def committed_phases(rt: Runtime, count: int) -> int:
    """How many phases already have a committed model under the current spec."""
    done = 0
    for p in range(count if rt.is_main else 0):
        # A damaged phase is quarantined (read_output): it and the phases after it re-run.
        manifest = commits.read_output(rt.store, phase_folder(rt, p), rt.warn)
        if manifest is None or manifest.spec_hash != rt.run.spec_hash:
            break
        done = p + 1
    return rt.broadcast(done)


def phase_model(rt: Runtime, phase: int) -> tuple[torch.nn.Module, dict, loop.Moments]:
    """A committed phase's model, the stage's loss history up to its end and its optimizer's
    moments (what the next part starts from, as it would have straight after it)."""
    key = phase_folder(rt, phase)
    try:
        folder = commits.fetch(
            rt.store, commits.read_manifest(rt.store, key), rt.workdir / f"phase-{phase}"
        )
    except commits.CorruptCommit as err:
        if rt.is_main:
            commits.quarantine(rt.store, key, err.reason)
        raise
    history = json.loads((folder / HISTORY).read_text())
    moments = torch.load(folder / MOMENTS, weights_only=True) if (folder / MOMENTS).exists() else {}
    return models.load(folder / outputs.MODEL_DIR).to(rt.device), history, moments


def text_weights(model: torch.nn.Module, single_weight: float) -> list[float]:
    """Per block: how much its text-stream output counts in the feature loss. The last
    block's text output is read by nothing; single-stream blocks share their weights
    between streams, and the image stream is what the output is made from."""
    kinds = models.block_kinds(model)
    weights = [single_weight if kind == "single" else 1.0 for kind in kinds]
    weights[-1] = 0.0
    return weights


def part_engine(
    rt: Runtime, objective, params, moments: loop.Moments, offset: int, steps: int, total: int
):
    """The engine for one part of the stage (a phase, or the closing fine-tune) of `steps`
    steps starting at stage step `offset`. `phaseOptimizer: shared`: on the whole stage's
    schedule, with the part before's `moments`; `fresh`: a schedule of its own."""
    if params.phase_optimizer == "fresh":
        return loop.build_engine(rt, objective, params, steps)
    engine = loop.build_engine(rt, objective, params, total)
    loop.continue_schedule(engine, offset)
    loop.put_moments(engine, moments)
    return engine


def phase_inputs(rt: Runtime, params, train, sampler, target, boundaries, rollouts, student):
    """A phase's micro-batches: noised training rows and, with `rollouts`, the converted
    model's own sampling states, with the target model's hidden states and velocity on
    them all."""
    walk = own_velocity(rt, student)

    def make_inputs(micro_step: int):
        size = params.micro_batch_size
        own = params.on_policy_rows(size) if rollouts is not None else 0
        gen = sampler.generator(micro_step, rt.rank)
        rows = sampler.indices(micro_step, rt.rank, rt.world, size)[: size - own]
        parts = []
        if rows:
            t = torch.rand(len(rows), generator=gen)
            parts.append(data.noised(train.rows(rows, rt.device), t, gen)[0])
        if own:
            parts.append(rollouts.draw(walk, train, rt.device))
        x = concat(parts)
        states, velocity = teacher_states(target, loop.cast(x, rt.device, target.dtype), boundaries)
        return x, states, velocity

    return make_inputs


def calibration(rt: Runtime, train, params) -> list:
    """The batches a fitted conversion is computed on: `fitSamples` training rows at the
    fits' fixed times, drawn from the stage's seed (the same on every rank)."""
    if params.projection_init == "image":
        return []
    return spanfit.calibration(
        train, params.fit_samples, params.seed, params.micro_batch_size, rt.device, None
    )


@dataclass(frozen=True)
class Fusion:
    """What every phase of a fuse stage and its closing fine-tune share."""

    params: FuseStage
    fixed: torch.nn.Module  # the input model, frozen: every phase's target (target: input)
    train: object  # the training rows
    sampler: Sampler
    fit: list  # the rows a fitted init is computed on
    counts: list[int]  # single-stream blocks after each phase
    total: int  # steps of the whole stage


def run(rt: Runtime) -> Output:
    params = rt.run.stage
    model, layer_map = inputs.input_model(rt)
    fixed = model.requires_grad_(False).eval()
    already = model.config.get("num_single_layers", 0)
    counts = fuse.phases(params.single_layers, params.blocks_per_phase, already)
    total = len(counts) * params.steps + params.finetune_steps
    train, _ = inputs.datasets(rt, dict(model.config))
    sampler = Sampler(len(train), params.seed)
    f = Fusion(params, fixed, train, sampler, calibration(rt, train, params), counts, total)
    history: dict = {"phases": [], "losses": []}

    done = committed_phases(rt, len(counts))
    moments: loop.Moments = {}
    if done:
        model, history, moments = phase_model(rt, done - 1)
        following = f"phase-{done}" if done < len(counts) else "finetune"
        rt.log(
            "resumed",
            step=done * params.steps,
            checkpoint=phase_folder(rt, done - 1),
            phase=following,
            world=rt.world,
        )
    for p in range(done, len(counts)):
        model, engine, losses = train_phase(rt, f, model, p, moments)
        moments = loop.optimizer_moments(engine)
        history["phases"].append(
            {"singleLayers": counts[p], "firstLoss": losses[0], "finalLoss": losses[-1]}
        )
        history["losses"] += losses
        _commit_phase(rt, model, p, layer_map, history, moments)

    if params.finetune_steps:
        model, losses = closing_finetune(rt, f, model, moments)
        history["finetuneLoss"] = losses
        history["losses"] += losses

    metrics = {
        "phases": history["phases"],
        "finetuneLoss": history.get("finetuneLoss", []),
        "loss": history["losses"],
        "singleLayers": params.single_layers,
        "parameters": models.count_parameters(model),
        "blockKinds": models.block_kinds(model),
    }
    outputs.write_output(rt, model, layer_map, metrics, "phases + finetune")
    return Output(total, metrics)


def train_phase(rt: Runtime, f: Fusion, model, p: int, moments: loop.Moments):
    """Phase `p`: convert the next blocks to single-stream, then distil the whole model,
    block by block, against the phase's target, the optimizer starting from the phase
    before's `moments`. Returns (model, engine, losses)."""
    params = f.params
    target = f.fixed if params.target == "input" else model.requires_grad_(False).eval()
    fit = [loop.cast(x, rt.device, model.dtype) for x in f.fit]
    sequential = params.projection_init == "sequential"
    rank = fuse.text_rank(model.inner_dim, params.text_rank_fraction)
    student = fuse.convert(model, f.counts[p], fit, sequential, rank, params.refit_mlp)
    student = student.train().requires_grad_(True)
    depth = len(student.transformer_blocks)
    objective = LayerwiseDistillation(
        student,
        [(j, j) for j in range(depth)],
        "global",
        text_weights=text_weights(student, params.text_loss_weight),
    )
    boundaries = objective.boundaries()

    label = f"phase-{p}"
    offset = p * params.steps
    engine = part_engine(rt, objective, params, moments, offset, params.steps, f.total)
    state = checkpoint.resume_state(rt, engine, label)  # restores the schedule and moments too
    rollouts = rollouts_for(rt, params, state)
    make_inputs = phase_inputs(
        rt, params, f.train, f.sampler, target, boundaries, rollouts, student
    )
    part = loop.Part(params.steps, label, offset, f.total)
    state = loop.train(rt, engine, params, make_inputs, part, state, carry=rollouts)
    return outputs.trained_model(engine, state), engine, state["losses"]


def closing_finetune(rt: Runtime, f: Fusion, model, moments: loop.Moments):
    """Flow matching (and output distillation from the frozen teacher) after the last
    phase, the optimizer starting from its `moments`. Returns (model, losses)."""
    params, train = f.params, f.train
    teacher = inputs.teacher(rt) if params.distill_weight > 0 else None
    pool = inputs.target_pool(rt, teacher, params, (), len(train)) if teacher else None
    tuning = Sampler(len(pool) if pool else len(train), params.seed)
    objective = FlowMatching(
        model.train().requires_grad_(True), params.distill_weight, params.flow_weight
    )
    offset = len(f.counts) * params.steps
    engine = part_engine(rt, objective, params, moments, offset, params.finetune_steps, f.total)
    state = checkpoint.resume_state(rt, engine, "finetune")
    rollouts = rollouts_for(rt, params, state)

    def make_inputs(micro_step):
        return flow_inputs(rt, train, tuning, params, teacher, micro_step, pool, rollouts, model)

    part = loop.Part(params.finetune_steps, "finetune", offset, f.total)
    state = loop.train(rt, engine, params, make_inputs, part, state, carry=rollouts)
    return outputs.trained_model(engine, state), state["losses"]


def _commit_phase(rt: Runtime, model, phase: int, layer_map, history: dict, moments) -> None:
    if rt.is_main:
        local = rt.workdir / f"phase-out-{phase}"
        outputs.save_model(model, local, layer_map)
        (local / HISTORY).write_text(json.dumps(history))
        if moments:
            torch.save(moments, local / MOMENTS)
        folder = phase_folder(rt, phase)
        commits.commit(rt.store, folder, local, phase, spec_hash=rt.run.spec_hash, fence=rt.fence)
    rt.barrier()
