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
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch
import torch.nn.functional as F
from amber_trainer import data, models, prune
from amber_trainer.objectives import FlowMatching, LayerwiseDistillation, teacher_states


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


def call(model, x):
    return model(
        hidden_states=x.hidden_states,
        encoder_hidden_states=x.encoder_hidden_states,
        encoder_hidden_states_mask=x.encoder_hidden_states_mask,
        timestep=x.timestep,
        img_shapes=x.img_shapes,
        return_dict=False,
    )[0]


def timed(fn, steps: int) -> float:
    fn(0)  # warm-up: allocator, first-call overheads
    start = time.perf_counter()
    for i in range(1, steps + 1):
        fn(i)
    return (time.perf_counter() - start) / steps


def engine_for(objective):
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    params = [p for p in objective.parameters() if p.requires_grad]
    return deepspeed.initialize(model=objective, model_parameters=params, config=cfg)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    cfg = config(args.layers * 2)
    teacher = models.build(cfg).requires_grad_(False).eval()
    entries = prune.layer_map(list(range(0, args.layers * 2, 2)), args.layers * 2, "average")
    spans = [e.span for e in entries]
    batches = [inputs(cfg, args.batch, i) for i in range(args.steps + 1)]
    rows = []

    # finetune: baseline
    student = prune.prune(teacher, entries).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def base_finetune(i):
        x, target = batches[i]
        loss = F.mse_loss(call(student, x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    rows.append(("finetune", "diffusers loop", timed(base_finetune, args.steps), rss_mb()))
    engine = engine_for(FlowMatching(prune.prune(teacher, entries).train()))

    def trainer_finetune(i):
        x, target = batches[i]
        loss, _ = engine(x, target, None)
        engine.backward(loss)
        engine.step()

    rows.append(("finetune", "amber trainer", timed(trainer_finetune, args.steps), rss_mb()))

    # distill: baseline matches the teacher's output; the trainer matches every block too
    student = prune.prune(teacher, entries).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def base_distill(i):
        x, _ = batches[i]
        with torch.no_grad():
            target = call(teacher, x)
        loss = F.mse_loss(call(student, x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    rows.append(("distill", "diffusers loop", timed(base_distill, args.steps), rss_mb()))
    objective = LayerwiseDistillation(prune.prune(teacher, entries).train(), spans, "local")
    boundaries = objective.boundaries()
    engine = engine_for(objective)

    def trainer_distill(i):
        x, _ = batches[i]
        states, velocity = teacher_states(teacher, x, boundaries)
        loss, _ = engine(x, states, velocity)
        engine.backward(loss)
        engine.step()

    rows.append(("distill", "amber trainer", timed(trainer_distill, args.steps), rss_mb()))

    print(
        f"teacher {args.layers * 2} blocks -> student {args.layers}, batch {args.batch}, "
        f"{args.steps} steps, {torch.get_num_threads()} threads"
    )
    print(f"{'step':<9}{'loop':<16}{'ms/step':>9}{'samples/s':>11}{'peak RSS so far MB':>20}")
    for step, loop, seconds, rss in rows:
        print(f"{step:<9}{loop:<16}{seconds * 1e3:>9.1f}{args.batch / seconds:>11.1f}{rss:>20.0f}")
    for step in ("finetune", "distill"):
        base, ours = (s for st, _, s, _ in rows if st == step)
        print(f"{step}: trainer speed / baseline speed = {base / ours:.2f}")


if __name__ == "__main__":
    main()
