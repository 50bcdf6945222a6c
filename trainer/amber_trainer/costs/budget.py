"""What a recipe costs: per-GPU memory of each stage (memory.py) and GPU-hours from model
FLOPs and throughput measured on an H200 (bench/gpu_step.py, docs/performance.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from amber.api import AmberCompression
from amber.plan import StageRun, plan
from amber_trainer.costs import memory
from amber_trainer.model import models

# Model TFLOP/s (recomputation not credited) measured on one H200 at full width, bf16.
THROUGHPUT = {
    "finetune": 407.0,  # trainer finetune step, micro-batch 8 (optimizer amortised)
    "finetune+ckpt": 321.0,
    "distill": 343.0,  # frozen-teacher forward + student step, micro-batch 2
    "distill+ckpt": 302.0,
    "forward": 375.0,  # full 60-block teacher forward, measured on an H200
}
FP64_TFLOPS = 60.0  # an H100's or H200's float64 tensor-core rate, near its peak of 67


@dataclass(frozen=True)
class StageCost:
    run: StageRun
    world: int
    memory: memory.StageMemory | None  # None: a stage that trains nothing
    flops: float | None  # None: not modelled (encode depends on the dataset's size)
    gpu_hours: float | None

    def fits(self, gpu_bytes: float) -> bool:
        return self.memory is None or self.memory.total <= gpu_bytes


def block_flops(width: int, tokens: int) -> float:
    """Forward FLOPs of one block for one sample: 24·d²·N (linear layers) + 4·N²·d (attention)."""
    return 24.0 * width**2 * tokens + 4.0 * tokens**2 * width


def shape_of(obj: AmberCompression, resolution: int | None, text_tokens: int | None):
    """The per-sample shape training sees: the synthetic data's, or the encode stage's."""
    synthetic = obj.spec.data.synthetic
    if synthetic is not None and resolution is None:
        side = synthetic.latent_size // 2
        return memory.Shape(1, side * side, text_tokens or synthetic.text_tokens)
    encode = next((s for s in obj.spec.pipeline() if s.type == "encode"), None)
    res = resolution or (encode.resolution if encode else 1024)
    text = text_tokens or (encode.max_text_tokens if encode else 512)
    return memory.Shape.at(res, text, 1)


def score_flops(stage, layers: int, f: float) -> float:
    """Forward FLOPs of a score stage. Direct effect and block influence read one pass of
    the live blocks per round (the head calls are negligible); total effect also re-runs
    the blocks after each skipped one: about L²/2 block forwards per round."""
    samples = stage.calibration_samples * len(stage.timesteps)
    if stage.criterion in ("uniform", "first", "random", "explicit"):
        return 0.0
    rounds = [layers] if stage.mode == "one-shot" else range(layers, stage.target_layers, -1)
    if stage.criterion == "total-effect":
        return samples * sum(live * (live + 1) / 2 for live in rounds) * f
    return samples * sum(rounds) * f


def refit_flops(stage, teacher_layers: int, student_layers: int, f: float, width: int) -> float:
    """The MLP refit's cost, as forward FLOPs at the forward rate: one teacher pass and about
    three passes of each student block over `fitSamples` rows, and per block and stream one
    float64 Cholesky solve of the MLP's hidden width (4·width + 1) per output channel,
    scaled from the float64 rate to the forward one."""
    if not stage.refit_mlp:
        return 0.0
    passes = stage.fit_samples * (teacher_layers + 3 * student_layers) * f
    hidden = 4 * width + 1
    solves = 2 * student_layers * width * hidden**3 / 3
    return passes + solves * THROUGHPUT["forward"] / FP64_TFLOPS


def stage_flops(
    run: StageRun, teacher_layers: int, student_layers: int, f: float, world: int, width: int
):
    """Model FLOPs of a whole stage, `f` being one block's forward on one sample."""
    stage = run.stage
    if stage.type == "encode":
        return None
    if stage.type == "score":
        return score_flops(stage, teacher_layers, f)
    if stage.type == "eval":
        return stage.samples * stage.timestep_buckets * (teacher_layers + student_layers) * f
    if stage.type == "prune":
        return refit_flops(stage, teacher_layers, student_layers, f, width)
    if not stage.trains:
        return 0.0
    batch = stage.micro_batch_size * stage.gradient_accumulation * world
    student = 3 * student_layers * f
    if stage.type == "distill":
        return stage.steps * batch * (teacher_layers * f + student)
    teacher = teacher_layers * f if stage.distill_weight > 0 else 0.0
    # Each on-policy row also takes its trajectory's next Euler step: one student forward.
    own = stage.on_policy_rows(stage.micro_batch_size) * stage.gradient_accumulation * world
    walk = own * student_layers * f
    tuning = batch * (student + teacher) + walk
    if stage.type == "finetune":
        return stage.steps * tuning
    phases = math.ceil(stage.single_layers / stage.blocks_per_phase)
    phase = batch * (student_layers * f + student) + walk  # the input model is the target
    return phases * stage.steps * phase + stage.finetune_steps * tuning


def throughput(run: StageRun) -> float:
    if not run.stage.trains:
        return THROUGHPUT["forward"]
    kind = "finetune" if run.stage.type == "finetune" else "distill"
    return THROUGHPUT[kind + ("+ckpt" if run.deepspeed.activation_checkpointing else "")]


def costs(
    obj: AmberCompression,
    gpus_per_pod: int | None = None,
    resolution: int | None = None,
    text_tokens: int | None = None,
) -> list[StageCost]:
    given = obj.spec.teacher.config
    teacher = given.given() if given else models.named_config("qwen-image")
    runs = plan(obj)
    student = memory.student_config(teacher, runs)
    shape = shape_of(obj, resolution, text_tokens)
    width = teacher.get("num_attention_heads", 24) * teacher.get("attention_head_dim", 128)
    f = block_flops(width, shape.image_tokens + shape.text_tokens)
    out = []
    for run in runs:
        gpus = gpus_per_pod if gpus_per_pod is not None else run.resources.gpus_per_pod
        world = run.resources.pods * max(gpus, 1)
        mem = None
        if run.stage.trains:
            micro = memory.Shape(run.stage.micro_batch_size, shape.image_tokens, shape.text_tokens)
            compiled = run.deepspeed.compiles(run.deepspeed.zero_stage_for(world))
            mode = "compiled" if compiled else "eager"
            mem = memory.predict(run, teacher, student, micro, world, mode)
        flops = stage_flops(
            run, teacher.get("num_layers", 60), student.get("num_layers", 60), f, world, width
        )
        hours = None if flops is None else flops / (throughput(run) * 1e12) / 3600
        out.append(StageCost(run, world, mem, flops, hours))
    return out
