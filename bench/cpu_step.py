"""Trainer step throughput vs a plain diffusers training loop, same model, same run (CPU).

    python bench/cpu_step.py [--steps 20] [--layers 6]

Baseline: `QwenImageTransformer2DModel` called the diffusers way, torch AdamW, loss on the
output. Trainer: Amber's objectives in a DeepSpeed engine (ZeRO-2 config of the stages,
fp32 on CPU). Distill = frozen-teacher forward + student forward/backward/step; finetune =
flow-matching step. Prints ms/step, samples/s, peak RSS and trainer/baseline speed ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch
import torch.nn.functional as F

from amber.api import DeepSpeedSpec
from amber.stages import TrainingParams
from amber_trainer import data
from amber_trainer.model import models
from amber_trainer.model.forward import diffusers_forward
from amber_trainer.runtime import deepspeed_config
from amber_trainer.surgery import prune
from amber_trainer.train.loop import single_process_fast_path
from amber_trainer.train.objectives import FlowMatching, LayerwiseDistillation, teacher_states


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config(layers: int) -> dict:
    return models.named_config(
        "tiny",
        num_layers=layers,
        num_attention_heads=4,
        attention_head_dim=32,
        joint_attention_dim=64,
        axes_dims_rope=(8, 12, 12),
    )


def inputs(cfg, batch: int, seed: int):
    b = data.synthetic(cfg, batch, latent_size=32, text_tokens=32, batch_size=batch, seed=seed)[0]
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, generator=gen)
    noise = torch.randn(b.latents.shape, generator=gen)
    return b.noised(t, noise), noise - b.latents


def timed(fn, steps: int) -> float:
    fn(0)  # warm-up: allocator, first-call overheads
    start = time.perf_counter()
    for i in range(1, steps + 1):
        fn(i)
    return (time.perf_counter() - start) / steps


def engine_for(objective, params: TrainingParams):
    # The trainer's own DeepSpeed config and engine setup (one process, CPU), not a copy.
    cfg = deepspeed_config(DeepSpeedSpec(), params, 10**6, world=1, on_gpu=False)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    engine = deepspeed.initialize(model=objective, model_parameters=trainable, config=cfg)[0]
    return single_process_fast_path(engine, world=1)


def finetune_loops(teacher, entries, batches, params) -> dict:
    """One finetune step the diffusers way, and the trainer's objective in its engine."""
    student = prune.prune(teacher, entries).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, eps=1e-8)

    def base_finetune(i):
        x, target = batches[i]
        loss = F.mse_loss(diffusers_forward(student, x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    engine = engine_for(FlowMatching(prune.prune(teacher, entries).train()), params)

    def trainer_finetune(i):
        x, target = batches[i]
        loss, _ = engine(x, target, None)
        engine.backward(loss)
        engine.step()

    return {
        ("finetune", "diffusers loop"): base_finetune,
        ("finetune", "amber trainer"): trainer_finetune,
    }


def distill_loops(teacher, entries, batches, params) -> dict:
    """One distill step: the baseline matches the teacher's output; the trainer matches
    every block."""
    student = prune.prune(teacher, entries).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, eps=1e-8)

    def base_distill(i):
        x, _ = batches[i]
        with torch.no_grad():
            target = diffusers_forward(teacher, x)
        loss = F.mse_loss(diffusers_forward(student, x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    spans = [e.span for e in entries]
    objective = LayerwiseDistillation(prune.prune(teacher, entries).train(), spans, "local")
    boundaries = objective.boundaries()
    engine = engine_for(objective, params)

    def trainer_distill(i):
        x, _ = batches[i]
        states, velocity = teacher_states(teacher, x, boundaries)
        loss, _ = engine(x, states, velocity)
        engine.backward(loss)
        engine.step()

    return {
        ("distill", "diffusers loop"): base_distill,
        ("distill", "amber trainer"): trainer_distill,
    }


def report(args, times: dict) -> None:
    median = {key: statistics.median(values) for key, values in times.items()}
    print(
        f"teacher {args.layers * 2} blocks -> student {args.layers}, batch {args.batch}, "
        f"{args.rounds} rounds x {args.steps} steps, {torch.get_num_threads()} threads"
    )
    print(f"{'step':<9}{'loop':<16}{'ms/step':>9}{'samples/s':>11}{'spread ms':>11}")
    for (step, loop), seconds in median.items():
        spread = (max(times[(step, loop)]) - min(times[(step, loop)])) * 1e3
        print(
            f"{step:<9}{loop:<16}{seconds * 1e3:>9.1f}{args.batch / seconds:>11.1f}{spread:>11.1f}"
        )
    for step in ("finetune", "distill"):
        ratio = median[(step, "diffusers loop")] / median[(step, "amber trainer")]
        print(f"{step}: trainer speed / baseline speed = {ratio:.2f}")
    print(f"peak RSS of the whole run: {rss_mb():.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    params = TrainingParams(learning_rate=1e-4, micro_batch_size=args.batch)
    cfg = config(args.layers * 2)
    teacher = models.build(cfg).requires_grad_(False).eval()
    entries = prune.layer_map(list(range(0, args.layers * 2, 2)), args.layers * 2, "average")
    batches = [inputs(cfg, args.batch, i) for i in range(args.steps + 1)]
    loops = {
        **finetune_loops(teacher, entries, batches, params),
        **distill_loops(teacher, entries, batches, params),
    }
    # Interleaved rounds, median per loop: two shared cores make single timings noisy.
    times = {key: [] for key in loops}
    for _ in range(args.rounds):
        for key, fn in loops.items():
            times[key].append(timed(fn, args.steps))
    report(args, times)


if __name__ == "__main__":
    main()
