"""The benchmark's fixtures: the teacher (trained here with flow matching) and the judge.

    python bench/quality.py fixtures        # about 30 min on 2 CPU cores

writes `bench/quality/`: the teacher as a diffusers folder, the judge's weights, what
the build measured (`fixtures.json`) and `SHA256SUMS`. They are committed (about 19 MB), so
tests and benchmarks never retrain them; `load` refuses files whose checksum changed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from amber_trainer import models
from amber_trainer.forward import FlowInputs, velocity
from amber_trainer.quality import judge as judging
from amber_trainer.quality import task, text

# Qwen-Image's architecture at toy width: 12 dual-stream blocks of 3 heads x 32, reading
# MiniLM's 384-wide token states; 4.1M parameters.
CONFIG = {
    "patch_size": 2,
    "in_channels": task.CHANNELS,
    "out_channels": task.CHANNELS // 4,
    "num_layers": 12,
    "attention_head_dim": 32,
    "num_attention_heads": 3,
    "joint_attention_dim": text.WIDTH,
    "axes_dims_rope": (8, 12, 12),
}
TEACHER_DIR = "teacher"
JUDGE_FILE = "judge.safetensors"
SUMS = "SHA256SUMS"
REPORT = "fixtures.json"


def dataset(scenes: list[task.Scene], count: int, seed: int):
    """`count` renderings of `scenes`: (tokens, text, mask, scenes drawn)."""
    drawn = task.sample(scenes, count, seed)
    images = torch.stack([task.render(s, r) for s, r in drawn])
    embeddings, mask = text.encode_unique([s.caption for s, _ in drawn])
    return task.to_tokens(images), embeddings, mask, [s for s, _ in drawn]


def train_teacher(
    steps: int, batch: int = 64, lr: float = 1e-3, samples: int = 8192, seed: int = 0, log=print
) -> tuple[torch.nn.Module, list[float]]:
    """Flow matching from scratch on the training combinations: logit-normal times,
    AdamW with warm-up and linear decay, gradient clipping at 1."""
    train, _ = task.split()
    tokens, emb, mask, _ = dataset(train, samples, seed + 1)
    torch.manual_seed(seed)
    model = models.build(CONFIG, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * max(0.0, 1 - s / steps)
    )
    shapes = [[(1, task.SIDE, task.SIDE)]] * batch
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(tokens), (batch,))
        x0, eps = tokens[idx], torch.randn(batch, *tokens.shape[1:])
        t = torch.sigmoid(torch.randn(batch))
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        v = velocity(model, FlowInputs(xt, emb[idx], mask[idx], t, shapes))
        loss = (v - (eps - x0)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            mean = sum(losses[-100:]) / len(losses[-100:])
            log(
                f"teacher step {step + 1}/{steps}: loss {mean:.4f}, "
                f"{time.perf_counter() - started:.0f} s"
            )
    return model.eval(), losses


def train_judge(seed: int = 0, log=print) -> tuple[judging.Judge, dict]:
    """The judge, and its accuracy on fresh renderings of the held-out combinations."""
    drawn = task.sample(task.combinations(), 6000, seed + 11)
    images = torch.stack([task.render(s, r) for s, r in drawn])
    judge = judging.train(images, [s for s, _ in drawn], steps=800, batch=64, seed=seed, log=log)
    _, held = task.split()
    test = task.sample(held, 1000, seed + 12)
    test_images = torch.stack([task.render(s, r) for s, r in test])
    result = judging.grade(judge, test_images, [s for s, _ in test])
    return judge, {"heldOutImages": len(test), "score": result["score"], **result["attributes"]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (SUMS, REPORT))


def build(folder: Path, steps: int = 3000, log: Callable[[str], None] = print) -> dict:
    """Train the judge and the teacher into `folder`; what was measured (about 45 min on 2
    CPU cores, almost all of it the teacher)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    judge, accuracy = train_judge(log=log)
    log(f"judge on held-out real images: {accuracy}")
    # Stored in fp16 (half the bytes; the judge reads the same either way, re-checked by tests).
    state = {k: v.half() if v.is_floating_point() else v for k, v in judge.state_dict().items()}
    save_file(state, folder / JUDGE_FILE)
    judge_s = time.perf_counter() - started
    teacher, losses = train_teacher(steps, log=log)
    teacher.save_pretrained(folder / TEACHER_DIR, safe_serialization=True)
    report = {
        "command": f"python bench/quality.py fixtures --steps {steps}",
        "judgeSeconds": round(judge_s),
        "teacherSeconds": round(time.perf_counter() - started - judge_s),
        "threads": torch.get_num_threads(),
        "teacherSteps": steps,
        "teacherFinalLoss": sum(losses[-100:]) / len(losses[-100:]),
        "teacherParameters": models.count_parameters(teacher),
        "judgeHeldOutAccuracy": accuracy,
    }
    (folder / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    sums = [f"{_sha256(p)}  {p.relative_to(folder)}" for p in _files(folder)]
    (folder / SUMS).write_text("\n".join(sums) + "\n")
    return report


def verify(folder: Path) -> None:
    """Raise unless every fixture file matches SHA256SUMS."""
    folder = Path(folder)
    if not (folder / SUMS).exists():
        raise FileNotFoundError(
            f"{folder}: no fixtures; build them with `python bench/quality.py fixtures`"
        )
    expected = dict(
        reversed(line.split("  ", 1)) for line in (folder / SUMS).read_text().splitlines() if line
    )
    for name, digest in expected.items():
        if _sha256(folder / name) != digest:
            raise ValueError(f"{folder / name}: checksum differs from {SUMS}")


def load_judge(folder: Path) -> judging.Judge:
    verify(folder)
    judge = judging.Judge()
    judge.load_state_dict(load_file(str(Path(folder) / JUDGE_FILE)))  # fp16 -> fp32
    return judge.eval()


def load_teacher(folder: Path) -> torch.nn.Module:
    verify(folder)
    return models.load(Path(folder) / TEACHER_DIR).eval()
