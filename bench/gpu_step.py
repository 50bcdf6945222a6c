"""The trainer's distill and finetune steps at full Qwen-Image width on one GPU, next to
diffusers' own training step in the same run; the memory planner's prediction next to the
measured peak.

    python bench/gpu_step.py                  # GPU: 24 heads x 128, 4 student / 8 teacher blocks
    python bench/gpu_step.py --tiny --steps 2 # CPU smoke run of every path (tests run this)

Rows:
  anchor eager / anchor compiled   diffusers model in bf16, forward+backward, no optimizer
                                   (anchors measured before: 80 and 66 ms/step on an H200)
  diffusers step                   the diffusers training-script way: fp32 weights, bf16
                                   autocast, fused AdamW, gradient clipping
  trainer <step>                   Amber's objective in the trainer's own DeepSpeed engine
                                   (loop.make_engine: bf16 + fp32 master, compiled blocks,
                                   fused AdamW), with and without activation checkpointing
  diffusers distill                frozen bf16 teacher forward + the diffusers step on the
                                   student matching the teacher's output

TFLOP/s count model FLOPs only (24·d²·N for the linear layers and 4·N²·d for attention per
block forward and sample, x3 for a trained block): recomputation is not credited. MFU is
against the bf16 matrix-product rate measured at the start of the same run. Memory is
the peak allocated while a row was built and run, minus what was allocated before it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch
import torch.nn.functional as F

from amber.api import DeepSpeedSpec, StorageSpec, TeacherSpec
from amber.plan import StageRun
from amber.stages import DistillStage, FinetuneStage, TrainingParams
from amber_trainer import data
from amber_trainer.costs import memory
from amber_trainer.model import models
from amber_trainer.model.forward import diffusers_forward
from amber_trainer.surgery import prune
from amber_trainer.train import loop, speed
from amber_trainer.train.objectives import FlowMatching, LayerwiseDistillation, teacher_states

GIB = 2**30
# DeepSpeed's BF16_Optimizer (flat fp32 master, gradients and Adam state) instead of the
# per-tensor unfused path it picks for bf16 without ZeRO.
BF16_OPTIMIZER = {"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}
# DeepSpeed's FusedAdam, which also switches its bf16 wrapper to the fused FP16_Optimizer
# (flat fp32 master weights) instead of the per-tensor one torch's AdamW gets.
DEEPSPEED_FUSED_ADAM = {
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    }
}


def block_flops(width: int, tokens: int) -> float:
    """Forward FLOPs of one dual-stream block for one sample of `tokens` tokens."""
    return 24 * width**2 * tokens + 4 * tokens**2 * width


class Bench:
    def __init__(self, args):
        self.args = args
        self.gpu = torch.cuda.is_available() and not args.tiny
        self.device = torch.device("cuda" if self.gpu else "cpu")
        self.dtype = torch.bfloat16 if self.gpu else torch.float32
        if args.tiny:
            self.cfg = models.named_config("tiny", num_layers=2 * args.layers)
            latent, text = 8, 8
        else:
            self.cfg = models.named_config("qwen-image", num_layers=2 * args.layers)
            latent, text = 2 * int(args.image_tokens**0.5), args.text_tokens
        self.width = self.cfg.get("num_attention_heads", 24) * self.cfg.get(
            "attention_head_dim", 128
        )
        self.batches = []
        for seed in range(4):
            b = data.synthetic(self.cfg, args.batch, latent, text, args.batch, seed)[0]
            gen = torch.Generator().manual_seed(seed)
            t = torch.rand(args.batch, generator=gen)
            noise = torch.randn(b.latents.shape, generator=gen)
            x, target = b.noised(t, noise), noise - b.latents
            self.batches.append(loop.cast((x, target), self.device, self.dtype))
        self.tokens = self.batches[0][0].hidden_states.shape[1] + text
        self.shape = memory.Shape(args.batch, self.tokens - text, text)
        self.rows: list[dict] = []
        self.peak = self.matmul_peak()
        # One frozen teacher for every row (built once: random init of billions of weights
        # takes the CPU a while); rows that use it count its bytes in their peak.
        self.frozen = models.build(self.cfg).requires_grad_(False).eval()
        self.frozen = self.frozen.to(self.device, self.dtype)
        self.teacher_bytes = sum(p.numel() * p.element_size() for p in self.frozen.parameters())

    def sync(self):
        if self.gpu:
            torch.cuda.synchronize()

    def matmul_peak(self) -> float:
        """bf16 TFLOP/s of an 8192^3 matrix product: the denominator of MFU."""
        if not self.gpu:
            return float("nan")
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        self.sync()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        self.sync()
        return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12

    def teacher(self, compiled: bool):
        if compiled and self.gpu:
            speed.compile_blocks(self.frozen)  # the last rows use it compiled
        return self.frozen

    def student(self, dtype=None):
        keep = list(range(0, 2 * self.args.layers, 2))
        entries = prune.layer_map(keep, 2 * self.args.layers, "average")
        student = prune.prune(self.frozen, entries).train().requires_grad_(True)
        return student.to(self.device, dtype or self.dtype), [e.span for e in entries]

    def measure(
        self, name: str, build, flops_per_step: float, predicted=None, teacher=False
    ) -> None:
        """Build a row's step function, time it, record ms/step, TFLOP/s and peak memory."""
        if self.args.rows and name not in self.args.rows.split(","):
            return
        gc.collect()
        if self.gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if self.gpu else 0
        try:
            step = build()
            for i in range(self.args.warmup):
                step(i)
            self.sync()
            times = []
            for i in range(self.args.steps):
                start = time.perf_counter()
                step(i)
                self.sync()
                times.append(time.perf_counter() - start)
        except Exception as err:  # one broken row must not cost the whole GPU slot
            self.rows.append({"row": name, "error": f"{type(err).__name__}: {err}"[:500]})
            print(f"{name}: FAILED {type(err).__name__}: {err}", flush=True)
            return
        if hasattr(step, "trained") and not step.trained():
            self.rows.append({"row": name, "error": "the optimizer did not change the weights"})
            print(f"{name}: FAILED: weights unchanged", flush=True)
            return
        seconds = statistics.median(times)
        peak = (torch.cuda.max_memory_allocated() - before) if self.gpu else float("nan")
        peak += self.teacher_bytes if teacher else 0
        row = {
            "row": name,
            "ms_per_step": seconds * 1e3,
            "tflops": flops_per_step / seconds / 1e12,
            "mfu": flops_per_step / seconds / 1e12 / self.peak,
            "peak_gib": peak / GIB,
        }
        if predicted is not None:
            row["predicted_gib"] = predicted.total / GIB
            row["predicted"] = {
                k: v / GIB
                for k, v in predicted.as_dict().items()
                if k != "stage" and isinstance(v, float)
            }
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        del step
        gc.collect()

    # -- rows -------------------------------------------------------------------------------

    def anchor(self, compiled: bool):
        def build():
            model, _ = self.student()
            if compiled and self.gpu:
                speed.compile_blocks(model)

            def step(i):
                x, target = self.batches[i % 4]
                F.mse_loss(diffusers_forward(model, x).float(), target.float()).backward()
                for p in model.parameters():
                    p.grad = None

            return step

        return build

    def diffusers_step(self, distill: bool):
        def build():
            teacher = self.teacher(False) if distill else None
            student, _ = self.student(torch.float32)
            fused = {"fused": True} if self.gpu else {}
            opt = torch.optim.AdamW(student.parameters(), lr=1e-5, **fused)

            def step(i):
                x, target = self.batches[i % 4]
                if teacher is not None:
                    with torch.no_grad():
                        target = diffusers_forward(teacher, x)
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.gpu):
                    x32 = loop.cast(x, self.device, torch.float32)
                    loss = F.mse_loss(diffusers_forward(student, x32).float(), target.float())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            return step

        return build

    def ds_spec(self, checkpointing: bool, compiled: bool = True) -> DeepSpeedSpec:
        return DeepSpeedSpec(activation_checkpointing=checkpointing, compile=compiled)

    def trainer_finetune(
        self, checkpointing: bool, compiled: bool = True, overrides=None, accumulation: int = 1
    ):
        def build():
            student, _ = self.student()
            params = TrainingParams(
                micro_batch_size=self.args.batch, gradient_accumulation=accumulation
            )
            ds = self.ds_spec(checkpointing, compiled)
            engine = loop.make_engine(
                FlowMatching(student), ds, params, 10**6, 1, self.device, overrides
            )

            weight = student.transformer_blocks[0].attn.to_q.weight
            before = weight.detach().clone()

            def step(i):
                for micro in range(accumulation):
                    x, target = self.batches[(i + micro) % 4]
                    loss, _ = engine(x, target, None)
                    engine.backward(loss)
                    engine.step()

            step.trained = lambda: not torch.equal(before, weight.detach())
            return step

        return build

    def trainer_distill(self, checkpointing: bool):
        def build():
            teacher = self.teacher(compiled=True)
            student, spans = self.student()
            objective = LayerwiseDistillation(student, spans, "local")
            boundaries = objective.boundaries()
            params = TrainingParams(micro_batch_size=self.args.batch)
            ds = self.ds_spec(checkpointing)
            engine = loop.make_engine(objective, ds, params, 10**6, 1, self.device)

            def step(i):
                x, _ = self.batches[i % 4]
                states, velocity = teacher_states(teacher, x, boundaries)
                loss, _ = engine(x, states, velocity)
                engine.backward(loss)
                engine.step()

            return step

        return build

    def prediction(self, stage, checkpointing: bool, compiled: bool = True):
        run = StageRun(
            namespace="bench",
            name="bench",
            index=0,
            stage=stage,
            teacher=TeacherSpec(config=self.cfg),
            data={"synthetic": {}},
            storage=StorageSpec(uri="/tmp/bench"),
            deepspeed=self.ds_spec(checkpointing, compiled),
            resources={"gpusPerPod": 1},
        )
        student = {**self.cfg, "num_layers": self.args.layers}
        mode = "compiled" if compiled and self.gpu else "eager"
        return memory.predict(run, self.cfg, student, self.shape, world=1, mode=mode)

    def run(self) -> None:
        b, n, d, L = self.args.batch, self.tokens, self.width, self.args.layers
        student_fwd = L * b * block_flops(d, n)
        teacher_fwd = 2 * L * b * block_flops(d, n)
        train = 3 * student_fwd
        finetune = FinetuneStage(name="finetune")
        distill = DistillStage(name="distill")
        self.measure("anchor eager", self.anchor(False), train)
        self.measure("anchor compiled", self.anchor(True), train)
        self.measure("diffusers step", self.diffusers_step(False), train)
        for ckpt in (False, True):
            label = "trainer finetune" + (" +ckpt" if ckpt else "")
            self.measure(label, self.trainer_finetune(ckpt), train, self.prediction(finetune, ckpt))
        for accumulation in (1, 4):
            self.measure(
                "trainer finetune bf16opt" + (f" x{accumulation}" if accumulation > 1 else ""),
                self.trainer_finetune(False, overrides=BF16_OPTIMIZER, accumulation=accumulation),
                train * accumulation,
            )
        self.measure("trainer finetune x4", self.trainer_finetune(False, accumulation=4), train * 4)
        if self.gpu:  # DeepSpeed's own fused Adam: a CUDA extension, built on first use
            for accumulation in (1, 4):
                self.measure(
                    "trainer finetune dsfused" + (f" x{accumulation}" if accumulation > 1 else ""),
                    self.trainer_finetune(
                        False, overrides=DEEPSPEED_FUSED_ADAM, accumulation=accumulation
                    ),
                    train * accumulation,
                )
        self.measure(
            "trainer finetune eager",
            self.trainer_finetune(False, compiled=False),
            train,
            self.prediction(finetune, False, compiled=False),
        )
        self.measure(
            "diffusers distill", self.diffusers_step(True), train + teacher_fwd, teacher=True
        )
        for ckpt in (False, True):
            label = "trainer distill" + (" +ckpt" if ckpt else "")
            self.measure(
                label,
                self.trainer_distill(ckpt),
                train + teacher_fwd,
                self.prediction(distill, ckpt),
                teacher=True,
            )

    def report(self) -> dict:
        by = {r["row"]: r for r in self.rows if "error" not in r}
        ratios = {}
        for trainer, base in (
            ("trainer finetune", "diffusers step"),
            ("trainer finetune +ckpt", "diffusers step"),
            ("trainer distill", "diffusers distill"),
            ("trainer distill +ckpt", "diffusers distill"),
            ("anchor compiled", "anchor eager"),
        ):
            if trainer in by and base in by:
                ratios[f"{trainer} vs {base}"] = (
                    by[base]["ms_per_step"] / by[trainer]["ms_per_step"]
                )
        device = torch.cuda.get_device_name() if self.gpu else "cpu"
        print(
            f"\n{device}; matmul peak {self.peak:.0f} TFLOP/s; batch {self.args.batch}, "
            f"{self.tokens} tokens, width {self.width}, student {self.args.layers} / teacher "
            f"{2 * self.args.layers} blocks; median of {self.args.steps} steps"
        )
        print(f"{'row':<26}{'ms/step':>9}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'plan GiB':>10}")
        for r in self.rows:
            if "error" in r:
                print(f"{r['row']:<26} failed: {r['error']}")
                continue
            plan = f"{r['predicted_gib']:>10.2f}" if "predicted_gib" in r else f"{'':>10}"
            print(
                f"{r['row']:<26}{r['ms_per_step']:>9.1f}{r['tflops']:>9.1f}"
                f"{r['mfu'] * 100:>6.1f}%{r['peak_gib']:>10.2f}{plan}"
            )
        for label, ratio in ratios.items():
            print(f"speed {label}: {ratio:.2f}x")
        return {
            "device": device,
            "matmul_tflops": self.peak,
            "args": {k: str(v) for k, v in vars(self.args).items()},
            "tokens": self.tokens,
            "width": self.width,
            "torch": torch.__version__,
            "rows": self.rows,
            "ratios": ratios,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="student blocks (teacher: 2x)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-tokens", type=int, default=4096)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU")
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    # Same code, other shapes and modes: let every variant keep its compiled graph.
    torch._dynamo.config.cache_size_limit = 64
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("LOCAL_RANK", "0")
    gpu = torch.cuda.is_available() and not args.tiny
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    bench = Bench(args)
    bench.run()
    result = bench.report()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if any("error" in r for r in bench.rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
