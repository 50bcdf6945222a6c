"""The benchmark's fixtures: the teacher (trained here with flow matching) and the judge.

    python bench/quality.py fixtures        # about 100 min on 2 CPU cores; resumable

writes `bench/quality/`: the teacher as a diffusers folder, the judge's weights, what
the build measured (`fixtures.json`) and `SHA256SUMS`. They are committed (about 17 MB), so
tests and benchmarks never retrain them; `load` refuses files whose checksum changed. A
judge already there (and intact) is kept: the measuring instrument outlives teachers.

The build gates the teacher before it writes the checksums: its held-out score must reach
`GATE_SCORE`, and it reports what skipping one or two random non-edge blocks costs (how much
of a deep model's redundancy this teacher has).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from amber_trainer.model import models
from amber_trainer.model.forward import FlowInputs, velocity
from amber_trainer.quality import judge as judging
from amber_trainer.quality import measure, task, text
from amber_trainer.train import speed

# Qwen-Image's architecture at toy width and real depth ratios: 24 dual-stream blocks of
# 2 heads x 32 (a block costs about 36·d², so 24·64² is close to the first teacher's
# 12·96²), reading MiniLM's 384-wide token states; 3.6M parameters. Pruned 24 -> 12 as
# Qwen-Image is pruned 60 -> 30.
CONFIG = {
    "patch_size": 2,
    "in_channels": task.CHANNELS,
    "out_channels": task.CHANNELS // 4,
    "num_layers": 24,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": text.WIDTH,
    "axes_dims_rope": (8, 12, 12),
}
TEACHER_DIR = "teacher"
JUDGE_FILE = "judge.safetensors"
SUMS = "SHA256SUMS"
REPORT = "fixtures.json"
GATE_SCORE = 0.90  # held-out score a teacher needs to become the fixture
# 3,000 steps (the 12-block teacher's) left the 24-block one at 82.1% held out (loss 0.040):
# a deeper, narrower teacher needs a longer schedule.
STEPS = 6000
SKIP_DRAWS = 4  # random draws per number of skipped blocks in the redundancy report


def dataset(scenes: list[task.Scene], count: int, seed: int):
    """`count` renderings of `scenes`: (tokens, text, mask, scenes drawn)."""
    drawn = task.sample(scenes, count, seed)
    images = torch.stack([task.render(s, r) for s, r in drawn])
    embeddings, mask = text.encode_unique([s.caption for s, _ in drawn])
    return task.to_tokens(images), embeddings, mask, [s for s, _ in drawn]


def _save_atomic(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_teacher(
    steps: int,
    batch: int = 64,
    lr: float = 1e-3,
    samples: int = 8192,
    seed: int = 0,
    log=print,
    checkpoint: Path | None = None,
    every: int = 250,
    compile: bool = False,
) -> tuple[torch.nn.Module, list[float], float]:
    """Flow matching from scratch on the training combinations: logit-normal times,
    AdamW with warm-up and linear decay, gradient clipping at 1. With `checkpoint`, the
    whole training state is saved there every `every` steps and a run of the same
    configuration continues from it: an hour of two cores is not lost to an interruption.
    `compile` compiles the blocks (about 20% faster on two CPU cores after a minute of
    compiling; the numbers differ from eager ones in the last bits). Returns the model,
    the loss of every step and the seconds spent training (all runs)."""
    train, _ = task.split()
    tokens, emb, mask, _ = dataset(train, samples, seed + 1)
    torch.manual_seed(seed)
    model = models.build(CONFIG, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * max(0.0, 1 - s / steps)
    )
    key = {"config": CONFIG, "steps": steps, "batch": batch, "lr": lr, "samples": samples}
    losses: list[float] = []
    spent, first = 0.0, 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if json.dumps(state["key"], sort_keys=True) == json.dumps(key, sort_keys=True):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            losses, spent, first = state["losses"], state["seconds"], state["step"]
            log(f"resuming the teacher at step {first}/{steps} from {checkpoint}")
        else:
            log(f"{checkpoint} is another configuration's; starting over")
    if compile:
        speed.compile_blocks(model)
    shapes = [[(1, task.SIDE, task.SIDE)]] * batch
    started = time.perf_counter()
    for step in range(first, steps):
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
        elapsed = spent + time.perf_counter() - started
        if step % 100 == 0 or step == steps - 1:
            mean = sum(losses[-100:]) / len(losses[-100:])
            log(f"teacher step {step + 1}/{steps}: loss {mean:.4f}, {elapsed:.0f} s")
        if checkpoint is not None and ((step + 1) % every == 0 or step == steps - 1):
            state = {
                "key": key,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(),
                "losses": losses,
                "seconds": elapsed,
                "step": step + 1,
            }
            _save_atomic(state, checkpoint)
    return model.eval(), losses, spent + time.perf_counter() - started


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


def _judge(folder: Path, log) -> tuple[judging.Judge, dict, float]:
    """The folder's judge if it is there and intact, else a new one; its held-out accuracy."""
    started = time.perf_counter()
    path = folder / JUDGE_FILE
    if path.exists() and _expected(folder).get(JUDGE_FILE) == _sha256(path):
        log(f"keeping the judge in {path}")
        judge = judging.Judge()
        judge.load_state_dict(load_file(str(path)))
        before = json.loads((folder / REPORT).read_text())
        return judge.eval(), before["judgeHeldOutAccuracy"], before["judgeSeconds"]
    judge, accuracy = train_judge(log=log)
    # Stored in fp16 (half the bytes; the judge reads the same either way, re-checked by tests).
    state = {k: v.half() if v.is_floating_point() else v for k, v in judge.state_dict().items()}
    save_file(state, path)
    return judge, accuracy, time.perf_counter() - started


def skip_costs(model, judge: judging.Judge, suites, draws: int = SKIP_DRAWS, seed: int = 0) -> dict:
    """Held-out score of the whole model and with 1 or 2 random non-edge blocks skipped
    (`draws` seeded draws each): how close the model is to "a few blocks are free"."""
    from amber_trainer.surgery import prune

    layers = len(model.transformer_blocks)
    full = measure.evaluate(model, judge, suites)["score"]
    rng = random.Random(seed)
    report = {"score": full}
    for count in (1, 2):
        rows = []
        for _ in range(draws):
            skipped = sorted(rng.sample(range(1, layers - 1), count))
            keep = [i for i in range(layers) if i not in skipped]
            student = prune.prune(model, prune.layer_map(keep, layers, "keep"))
            score = measure.evaluate(student, judge, suites)["score"]
            rows.append({"skipped": skipped, "score": score})
        mean = sum(r["score"] for r in rows) / len(rows)
        report[f"skip{count}"] = {"meanScore": mean, "meanCost": full - mean, "draws": rows}
    return report


def default_checkpoint() -> Path:
    """Where a teacher build keeps its training state: outside the checkout, so that
    neither a clean clone nor the fixture's checksums see it."""
    return Path(os.environ.get("AMBER_CACHE", Path.home() / ".cache" / "amber")) / "teacher.pt"


def build(
    folder: Path,
    steps: int = STEPS,
    log: Callable[[str], None] = print,
    checkpoint: Path | None = None,
    compile: bool = True,
) -> dict:
    """Train (or keep) the judge and train the teacher into `folder`, gate the teacher, and
    write the checksums; what was measured. A teacher that misses `GATE_SCORE` is saved
    beside `checkpoint` (for a look, or to train on) and nothing in `folder` changes."""
    checkpoint = checkpoint or default_checkpoint()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    judge, accuracy, judge_s = _judge(folder, log)
    log(f"judge on held-out real images: {accuracy}")
    model, losses, teacher_s = train_teacher(steps, log=log, checkpoint=checkpoint, compile=compile)
    suites = measure.suites(model, seed=0)
    gates = skip_costs(model, judge, suites)
    log(f"teacher held-out score {gates['score']:.3f}; skip costs {gates}")
    report = {
        "command": f"python bench/quality.py fixtures --steps {steps}",
        "judgeSeconds": round(judge_s),
        "teacherSeconds": round(teacher_s),
        "threads": torch.get_num_threads(),
        "teacherConfig": CONFIG,
        "teacherSteps": steps,
        "teacherFinalLoss": sum(losses[-100:]) / len(losses[-100:]),
        "teacherParameters": models.count_parameters(model),
        "judgeHeldOutAccuracy": accuracy,
        "gate": {"minScore": GATE_SCORE, "heldOutPrompts": len(suites.held_out), **gates},
    }
    if gates["score"] < GATE_SCORE:
        rejected = checkpoint.with_name("rejected-teacher")
        model.save_pretrained(rejected, safe_serialization=True)
        (rejected / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        raise RuntimeError(
            f"saved to {rejected}; "
            f"teacher held-out score {gates['score']:.3f} is below the gate {GATE_SCORE}; "
            f"not written (train longer: --steps): {json.dumps(report)}"
        )
    if (folder / REPORT).exists():  # the record of refused teachers outlives the fixture
        before = json.loads((folder / REPORT).read_text()).get("rejectedAttempts")
        if before:
            report["rejectedAttempts"] = before
    (folder / SUMS).unlink(missing_ok=True)
    model.save_pretrained(folder / TEACHER_DIR, safe_serialization=True)
    (folder / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    sums = [f"{_sha256(p)}  {p.relative_to(folder)}" for p in _files(folder)]
    (folder / SUMS).write_text("\n".join(sums) + "\n")
    return report


def _expected(folder: Path) -> dict[str, str]:
    """File name -> SHA-256 as SHA256SUMS lists them (empty without one)."""
    sums = Path(folder) / SUMS
    if not sums.exists():
        return {}
    lines = sums.read_text().splitlines()
    return dict(reversed(line.split("  ", 1)) for line in lines if line)


def verify(folder: Path, prefix: str = "") -> None:
    """Raise unless every fixture file (whose name starts with `prefix`) matches SHA256SUMS."""
    folder = Path(folder)
    if not (folder / SUMS).exists():
        raise FileNotFoundError(
            f"{folder}: no fixtures; build them with `python bench/quality.py fixtures`"
        )
    expected = _expected(folder)
    if not any(name.startswith(prefix) for name in expected):
        raise ValueError(f"{folder / SUMS} lists no {prefix or 'file'}")
    for name, digest in expected.items():
        if name.startswith(prefix) and _sha256(folder / name) != digest:
            raise ValueError(f"{folder / name}: checksum differs from {SUMS}")


def load_judge(folder: Path) -> judging.Judge:
    verify(folder, JUDGE_FILE)
    judge = judging.Judge()
    judge.load_state_dict(load_file(str(Path(folder) / JUDGE_FILE)))  # fp16 -> fp32
    return judge.eval()


def load_teacher(folder: Path) -> torch.nn.Module:
    verify(folder, f"{TEACHER_DIR}/")
    return models.load(Path(folder) / TEACHER_DIR).eval()
