"""Stage `fuse`: progressive hybrid-stream conversion, then a short fine-tune.

Phase p converts the next `blocksPerPhase` dual-stream blocks (deepest first) into
single-stream ones and distils the new model against the model of phase p-1, block by block
and on the output. Each phase's model is committed under `{stage}/phases/phase-P/`, so a
restart resumes inside the phase it stopped in, against the right teacher.
"""

from __future__ import annotations

import torch

from amber import commits
from amber_trainer import checkpoint, loop, models
from amber_trainer import fuse as fusing
from amber_trainer.data import Sampler
from amber_trainer.objectives import FlowMatching, LayerwiseDistillation, teacher_states
from amber_trainer.runtime import Runtime
from amber_trainer.stages import common
from amber_trainer.stages.finetune import flow_inputs


def phase_folder(rt: Runtime, phase: int) -> str:
    return f"{rt.stage}/phases/phase-{phase}"


def committed_phases(rt: Runtime, count: int) -> int:
    """How many phases already have a committed model under the current spec."""
    done = 0
    for p in range(count):
        manifest = commits.read_manifest(rt.store, phase_folder(rt, p))
        if manifest is None or manifest.spec_hash != rt.run.spec_hash:
            break
        done = p + 1
    return rt.broadcast(done)


def phase_model(rt: Runtime, phase: int):
    folder = commits.fetch(
        rt.store,
        commits.read_manifest(rt.store, phase_folder(rt, phase)),
        rt.workdir / f"phase-{phase}",
    )
    return models.load(folder / common.MODEL_DIR).to(rt.device)


def resume_state(rt: Runtime, engine, label: str):
    manifest = checkpoint.latest(rt)
    if manifest is None or manifest.metrics.get("label") != label:
        return None
    rt.log("resumed", step=manifest.step, checkpoint=manifest.folder, phase=label)
    return checkpoint.load(rt, engine, manifest)


def run(rt: Runtime) -> tuple[int, dict]:
    params = rt.run.stage
    model, layer_map = common.input_model(rt)
    already = model.config.get("num_single_layers", 0)
    counts = fusing.phases(params.single_layers, params.blocks_per_phase, already)
    total = len(counts) * params.steps + params.finetune_steps
    train, _ = common.datasets(rt, dict(model.config))
    sampler = Sampler(len(train), params.seed)
    history: dict = {"phases": [], "losses": []}

    done = committed_phases(rt, len(counts))
    if done:
        model = phase_model(rt, done - 1)
    for p in range(done, len(counts)):
        previous = model.requires_grad_(False).eval()
        student = fusing.convert(previous, counts[p]).train().requires_grad_(True)
        depth = len(student.transformer_blocks)
        objective = LayerwiseDistillation(student, [(j, j) for j in range(depth)], "global")
        boundaries = objective.boundaries()

        def make_inputs(micro_step, previous=previous, boundaries=boundaries):
            gen = sampler.generator(micro_step, rt.rank)
            rows = sampler.indices(micro_step, rt.rank, rt.world, params.micro_batch_size)
            x, _ = common.noised(
                train.rows(rows, rt.device), torch.rand(len(rows), generator=gen), gen
            )
            states, velocity = teacher_states(
                previous, loop.cast(x, rt.device, previous.dtype), boundaries
            )
            return x, states, velocity

        label = f"phase-{p}"
        engine = loop.build_engine(rt, objective, params, params.steps)
        state = resume_state(rt, engine, label)
        state = loop.train(
            rt, engine, params, make_inputs, params.steps, label, p * params.steps, state, total
        )
        model = common.trained_model(engine)
        history["phases"].append(
            {
                "singleLayers": counts[p],
                "firstLoss": state["losses"][0],
                "finalLoss": state["losses"][-1],
            }
        )
        history["losses"] += state["losses"]
        _commit_phase(rt, model, p, layer_map)

    if params.finetune_steps:
        objective = FlowMatching(model.train().requires_grad_(True))
        engine = loop.build_engine(rt, objective, params, params.finetune_steps)
        state = resume_state(rt, engine, "finetune")
        offset = len(counts) * params.steps

        def make_inputs(micro_step):
            return flow_inputs(rt, train, sampler, params, None, micro_step)

        state = loop.train(
            rt, engine, params, make_inputs, params.finetune_steps, "finetune", offset, state, total
        )
        model = common.trained_model(engine)
        history["finetuneLoss"] = state["losses"]
        history["losses"] += state["losses"]

    metrics = {
        "phases": history["phases"],
        "finetuneLoss": history.get("finetuneLoss", []),
        "loss": history["losses"],
        "singleLayers": params.single_layers,
        "parameters": models.count_parameters(model),
        "blockKinds": models.block_kinds(model),
    }
    common.write_output(rt, model, layer_map, metrics, "phases + finetune")
    return total, metrics


def _commit_phase(rt: Runtime, model, phase: int, layer_map) -> None:
    if rt.is_main:
        local = rt.workdir / f"phase-out-{phase}"
        common.save_model(model, local, layer_map)
        commits.commit(rt.store, phase_folder(rt, phase), local, phase, spec_hash=rt.run.spec_hash)
    rt.barrier()
