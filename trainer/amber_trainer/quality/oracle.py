"""The oracle sweep: which pruning criterion predicts what *recovers*?

Many keep sets of the teacher are each pruned, recovered with the preset's budget
(fine-tuning with output distillation, after a local warm start if the recipe has one) in a
stripped single-process loop, and judged. Every criterion ranks the same keep sets by the
importance it gives the kept blocks (and "after prune" by the score before any training);
the Spearman correlation of each ranking with the post-recovery score says how well the
criterion predicts it. It is the ground truth the criteria are chased against, and needs a
GPU at the real sweep's size (`bench/oracle.py`); tests run it on a tiny CPU configuration.

The loop is the stages' objectives with a plain AdamW and the same warm-up and linear decay,
on the pooled teacher targets: what a stage computes, without DeepSpeed, storage or commits.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from amber.stages import ScoreStage
from amber_trainer.data import Sampler, TensorDataset
from amber_trainer.quality import measure
from amber_trainer.surgery import prune, score
from amber_trainer.train import targets
from amber_trainer.train.objectives import FlowMatching, LayerwiseDistillation

CRITERIA = ("importance", "total-effect", "block-influence")


@dataclass(frozen=True)
class Recipe:
    """The recovery budget (the benchmark's `arms.Budget` sizes)."""

    distill_steps: int = 0  # a warm start: the presets have none
    finetune_steps: int = 200
    micro_batch: int = 24
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    distill_weight: float = 0.9  # the presets' KD-dominant weights
    flow_weight: float = 0.1


def keep_sets(layers: int, target: int, count: int, seed: int) -> list[list[int]]:
    """`count` distinct keep sets with the first and last block, the rest drawn at random."""
    rng = random.Random(seed)
    inner = list(range(1, layers - 1))
    found: dict[tuple[int, ...], None] = {}
    while len(found) < count:
        found[tuple(sorted([0, layers - 1, *rng.sample(inner, target - 2)]))] = None
    return [list(k) for k in found]


def _schedule(opt, steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _train(objective, steps: int, recipe: Recipe, make_inputs, device) -> list[float]:
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, recipe.learning_rate, weight_decay=0.0)
    sched = _schedule(opt, steps, recipe.warmup_steps)
    losses = []
    for step in range(steps):
        loss, _ = objective(*make_inputs(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.detach())
    return [float(v) for v in torch.stack(losses)] if losses else []


def recover(
    teacher,
    keep: Sequence[int],
    train: TensorDataset,
    distill_pool: targets.Pool,
    finetune_pool: targets.Pool,
    recipe: Recipe,
    seed: int,
    device=None,
):
    """The pruned (averaged) student of `keep`, recovered; and its two loss curves."""
    layers = len(teacher.transformer_blocks)
    entries = prune.layer_map(keep, layers, "average")
    student = prune.prune(teacher, entries).to(device).train().requires_grad_(True)
    spans = [e.span for e in entries]
    objective = LayerwiseDistillation(student, spans, "local", feature_loss="per-token")
    boundaries = objective.boundaries()
    sampler = Sampler(len(distill_pool), seed)

    def distill_inputs(step):
        rows = sampler.indices(step, 0, 1, recipe.micro_batch)
        _, x, _ = distill_pool.inputs(train, rows, device)
        return (x, *distill_pool.teacher_outputs(rows, boundaries, device))

    distill = _train(objective, recipe.distill_steps, recipe, distill_inputs, device)
    objective = FlowMatching(student, recipe.distill_weight, recipe.flow_weight)
    sampler = Sampler(len(finetune_pool), seed + 1)

    def finetune_inputs(step):
        rows = sampler.indices(step, 0, 1, recipe.micro_batch)
        _, x, target = finetune_pool.inputs(train, rows, device)
        return x, target, finetune_pool.teacher_outputs(rows, (), device)[1]

    finetune = _train(objective, recipe.finetune_steps, recipe, finetune_inputs, device)
    return student.eval(), distill, finetune


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 when either is constant."""

    def ranks(values):
        values = np.asarray(values, dtype=float)
        order = values.argsort(kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values))
        for v in np.unique(values):  # ties share their mean rank
            r[values == v] = r[values == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def criterion_scores(teacher, calibration, target: int, seed: int) -> dict[str, list[float]]:
    """Per-block aggregate importance of every data-driven criterion (the score stage's)."""
    out = {}
    for name in CRITERIA:
        params = ScoreStage(target_layers=target, criterion=name, seed=seed)
        out[name] = score.score(teacher, calibration, params).aggregate
    return out


def sweep(
    teacher,
    judge,
    train: TensorDataset,
    suites: measure.Suites,
    count: int,
    recipe: Recipe = Recipe(),
    pool: int = 4096,
    seed: int = 0,
    calibration_samples: int = 64,
    device=None,
    log=print,
) -> dict:
    """Recover `count` random keep sets; every criterion's Spearman with the outcome."""
    layers = len(teacher.transformer_blocks)
    target = layers // 2
    started = time.perf_counter()
    finetune = targets.TimestepSampling("logit-normal")
    pools = [
        targets.build(teacher, train, pool, sampling, seed + 1, with_states=states)
        for sampling, states in ((targets.UNIFORM, True), (finetune, False))
    ]
    calibration = [train.rows(list(range(i, i + 16))) for i in range(0, calibration_samples, 16)]
    blocks = criterion_scores(teacher, calibration, target, seed)
    rows = []
    for i, keep in enumerate(keep_sets(layers, target, count, seed)):
        pruned = prune.prune(teacher, prune.layer_map(keep, layers, "average"))
        after_prune = measure.evaluate(pruned, judge, suites)
        student, distill, ft = recover(teacher, keep, train, *pools, recipe, seed + i, device)
        result = measure.evaluate(student.cpu(), judge, suites)
        rows.append(
            {
                "keep": keep,
                "afterPrune": after_prune["score"],
                "afterPruneSoft": after_prune["softScore"],
                "score": result["score"],
                "softScore": result["softScore"],
                "velocityError": sum(result["velocityError"]) / len(result["velocityError"]),
                "distillLoss": distill[-1] if distill else None,
                "finetuneLoss": ft[-1] if ft else None,
                **{f"predicted.{c}": sum(blocks[c][k] for k in keep) for c in CRITERIA},
            }
        )
        log(
            f"keep set {i + 1}/{count} {keep}: score {result['score']:.3f}, "
            f"soft {result['softScore']:.3f}"
        )
    outcome = [r["softScore"] for r in rows]
    predictors = {
        **{c: [r[f"predicted.{c}"] for r in rows] for c in CRITERIA},
        "after prune (soft)": [r["afterPruneSoft"] for r in rows],
    }
    return {
        "keepSets": rows,
        "blockScores": blocks,
        "spearman": {name: spearman(v, outcome) for name, v in predictors.items()},
        "spearmanStrict": {
            name: spearman(v, [r["score"] for r in rows]) for name, v in predictors.items()
        },
        "recipe": recipe.__dict__,
        "seconds": round(time.perf_counter() - started),
    }
