"""Timestep-sensitive layer importance (docs/design.md, "score") and the layers that survive.

For each timestep t and calibration pair (x0, c) the input is x_t = (1-t)·x0 + t·ε. Block i's
importance at t is its *direct effect*: the relative change ||v_i - v|| / ||v|| of the
teacher's velocity when block i's own update to the image stream is taken out of the final
hidden state, everything else as in the full pass. It costs one output-head call per block.
The *total effect* (skip block i and re-run every later block, `total-effect`) also counts
how much the untouched downstream blocks amplify the change; recovery training repairs
exactly that, so it over-protects early blocks (docs/quality.md measures both).

Columns are normalised per timestep by a robust statistic (the median over blocks) and
aggregated by a weighted mean over timesteps, weighted by the share of the deployment
sampler's steps nearest each scored timestep, or by a max.

`selection: spans` partitions the teacher into `targetLayers` contiguous spans at least cost
(`partition`, dynamic programming) and keeps one representative block per span;
`selection: top` keeps the most important blocks. Baselines for ablation (`criterion`): block
influence (ShortGPT: 1 - cosine of a block's input and output states) and fixed patterns
that look at no data (evenly spaced, the first N, seeded random, or an explicit list).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

import torch

from amber.stages import ScoreStage
from amber_trainer.data import Batch
from amber_trainer.model.forward import embed, head, run_block, run_blocks
from amber_trainer.surgery.prune import representative


@dataclass
class ScoreResult:
    timesteps: list[float]
    matrix: list[list[float]]  # [layer][timestep] relative error of the full model
    aggregate: list[float]  # per layer, after normalisation and aggregation
    keep: list[int]  # sorted teacher indices that survive
    removal_order: list[int] = field(default_factory=list)  # iterative mode, first removed first
    spans: list[list[int]] = field(default_factory=list)  # selection spans: [first, last] each

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ScoreResult:
        return cls(**json.loads(text))


def calibration_inputs(batches: Sequence[Batch], timesteps: Sequence[float], seed: int):
    """(timestep index, x_t) for every timestep and calibration batch, with seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    for j, t in enumerate(timesteps):
        for batch in batches:
            noise = torch.randn(batch.latents.shape, generator=gen, dtype=batch.latents.dtype)
            device = batch.latents.device
            t_batch = torch.full((len(batch),), float(t), device=device)
            yield j, batch.noised(t_batch, noise.to(device))


@torch.no_grad()
def direct_effect_matrix(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    timesteps: Sequence[float],
    seed: int = 0,
    removed: Sequence[int] = (),
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """(layers, timesteps) relative change of the velocity when each live block's own
    image-stream update is removed from the final hidden state (rows of removed blocks
    are zero): one pass and one head call per block."""
    blocks = list(model.transformer_blocks)
    live = [i for i in range(len(blocks)) if i not in set(removed)]
    errors = torch.zeros(len(blocks), len(timesteps), dtype=torch.float64)
    samples = sum(len(b) for b in batches)
    for j, x in calibration_inputs(batches, timesteps, seed):
        img, txt, cond = embed(model, x)
        updates = {}
        for i in live:
            before = img
            img, txt = run_block(blocks[i], img, txt, cond)
            updates[i] = img - before
        full = head(model, img, cond).double()
        norm = full.flatten(1).norm(dim=1).clamp_min(1e-12)
        for i in live:
            without = head(model, img - updates[i], cond).double()
            rel = (without - full).flatten(1).norm(dim=1) / norm
            errors[i, j] += rel.sum().item() / samples
        if on_step:
            on_step()
    return errors


@torch.no_grad()
def total_effect_matrix(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    timesteps: Sequence[float],
    seed: int = 0,
    removed: Sequence[int] = (),
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """(layers, timesteps) relative error of skipping each block, with `removed` already gone.

    Rows of removed blocks are zero. Block i's skip reuses the hidden states of the full pass
    up to i, which halves the block evaluations of the naive L² loop.
    """
    blocks = list(model.transformer_blocks)
    live = [i for i in range(len(blocks)) if i not in set(removed)]
    errors = torch.zeros(len(blocks), len(timesteps), dtype=torch.float64)
    samples = sum(len(b) for b in batches)
    for j, x in calibration_inputs(batches, timesteps, seed):
        img, txt, cond = embed(model, x)
        states = []  # input of each live block in the full pass
        for i in live:
            states.append((img, txt))
            img, txt = run_block(blocks[i], img, txt, cond)
        full = head(model, img, cond).double()  # (B, N, C)
        norm = full.flatten(1).norm(dim=1).clamp_min(1e-12)
        for k, i in enumerate(live):
            rest = (blocks[r] for r in live[k + 1 :])
            img_i, _ = run_blocks(rest, *states[k], cond)
            skipped = head(model, img_i, cond).double()
            rel = (skipped - full).flatten(1).norm(dim=1) / norm
            errors[i, j] += rel.sum().item() / samples
        if on_step:
            on_step()
    return errors


@torch.no_grad()
def influence_matrix(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    timesteps: Sequence[float],
    seed: int = 0,
    removed: Sequence[int] = (),
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """(layers, timesteps) block influence: 1 - mean cosine similarity between each live
    block's input and output tokens (image and text streams together)."""
    blocks = list(model.transformer_blocks)
    live = [i for i in range(len(blocks)) if i not in set(removed)]
    influence = torch.zeros(len(blocks), len(timesteps), dtype=torch.float64)
    samples = sum(len(b) for b in batches)
    for j, x in calibration_inputs(batches, timesteps, seed):
        img, txt, cond = embed(model, x)
        for i in live:
            before = torch.cat([img, txt], dim=1)
            img, txt = run_block(blocks[i], img, txt, cond)
            after = torch.cat([img, txt], dim=1)
            cos = torch.nn.functional.cosine_similarity(before, after, dim=-1).double()
            influence[i, j] += (1 - cos.mean(dim=1)).sum().item() / samples
        if on_step:
            on_step()
    return influence


MATRICES = {
    "importance": direct_effect_matrix,
    "total-effect": total_effect_matrix,
    "block-influence": influence_matrix,
}
PATTERNS = ("uniform", "first", "random", "explicit")


def pattern(num_layers: int, params: ScoreStage) -> list[int]:
    """The layers a data-free baseline keeps."""
    n = params.target_layers
    if params.criterion == "explicit":
        if max(params.keep_layers) >= num_layers:
            raise ValueError(
                f"keepLayers {params.keep_layers} names a block beyond the teacher's {num_layers}"
            )
        return sorted(params.keep_layers)
    if params.criterion == "first":
        return list(range(n))
    if params.criterion == "uniform":
        return sorted({round(i * (num_layers - 1) / max(1, n - 1)) for i in range(n)})
    guard = protected(num_layers, params)
    rest = [i for i in range(num_layers) if i not in guard]
    return sorted(guard | set(random.Random(params.seed).sample(rest, n - len(guard))))


def sampler_weights(timesteps: Sequence[float], params: ScoreStage) -> torch.Tensor:
    """Each scored timestep's share of the deployment sampler's steps: the probability
    mass, under the sampler's schedule, of the times nearer to it than to any other."""
    order = sorted(range(len(timesteps)), key=lambda j: timesteps[j])
    ts = [float(timesteps[j]) for j in order]
    edges = [0.0, *((a + b) / 2 for a, b in pairwise(ts)), 1.0]
    s = params.sampler_shift

    def cdf(t: float) -> float:  # share of sampler times below t
        # shifted: t = generate.time_shift(u, s) for u uniform, so u = t / (s - (s-1)·t)
        return t if params.sampler == "uniform" else t / (s - (s - 1) * t)

    mass = [cdf(b) - cdf(a) for a, b in pairwise(edges)]
    weights = torch.zeros(len(ts), dtype=torch.float64)
    for rank, j in enumerate(order):
        weights[j] = mass[rank]
    return weights


def aggregate(matrix: torch.Tensor, params: ScoreStage) -> torch.Tensor:
    """Per-layer importance from the (layers, timesteps) matrix. Normalisation statistics
    are taken over the live (non-zero) rows only."""
    m = matrix.clone().double()
    live = m.abs().sum(dim=1) > 0
    if params.normalize != "none" and live.any():
        rows = m[live]
        stat = rows.median(dim=0).values if params.normalize == "median" else rows.amax(dim=0)
        m = m / stat.clamp_min(1e-12)
    if params.aggregate == "max":
        return m.max(dim=1).values
    if params.timestep_weights is not None:
        weights = torch.tensor(params.timestep_weights, dtype=m.dtype)
    else:
        weights = sampler_weights(params.timesteps, params)
    return (m * weights).sum(dim=1) / weights.sum().clamp_min(1e-12)


def partition(scores: Sequence[float], params: ScoreStage) -> tuple[list[list[int]], list[int]]:
    """The partition of the teacher's blocks into `targetLayers` contiguous spans of at
    most `maxSpan` blocks (the protected first and last blocks alone) whose summed cost is
    least, by dynamic programming; a span's cost is the importance of the blocks it drops
    (all but its representative). Returns the spans ([first, last]) and representatives."""
    layers, target = len(scores), params.target_layers
    guard = protected(layers, params)
    inf = float("inf")

    def cost(a: int, b: int) -> float:  # span [a, b]
        if b > a and any(i in guard for i in range(a, b + 1)):
            return inf
        blocks = list(range(a, b + 1))
        rep = representative(blocks, scores)
        return sum(float(scores[i]) for i in blocks if i != rep)

    # best[k][j]: least cost of covering blocks [0, j) with k spans; back[k][j]: last span's start
    best = [[inf] * (layers + 1) for _ in range(target + 1)]
    back = [[-1] * (layers + 1) for _ in range(target + 1)]
    best[0][0] = 0.0
    for k in range(1, target + 1):
        for j in range(1, layers + 1):
            for a in range(max(0, j - params.max_span), j):
                if best[k - 1][a] == inf:
                    continue
                c = best[k - 1][a] + cost(a, j - 1)
                if c < best[k][j]:
                    best[k][j], back[k][j] = c, a
    if best[target][layers] == inf:
        raise ValueError(
            f"no partition of {layers} blocks into targetLayers={target} spans of at most "
            f"maxSpan={params.max_span} blocks with the first {params.keep_first} and last "
            f"{params.keep_last} kept alone; raise maxSpan"
        )
    spans, j = [], layers
    for k in range(target, 0, -1):
        a = back[k][j]
        spans.append([a, j - 1])
        j = a
    spans.reverse()
    reps = [representative(list(range(a, b + 1)), scores) for a, b in spans]
    return spans, reps


def protected(num_layers: int, params: ScoreStage) -> set[int]:
    first = set(range(min(params.keep_first, num_layers)))
    last = set(range(max(0, num_layers - params.keep_last), num_layers))
    return first | last


def select(scores: torch.Tensor, params: ScoreStage) -> list[int]:
    """The `targetLayers` layers to keep: protected ones, then the most important."""
    keep = protected(len(scores), params)
    ranked = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    for i in ranked:
        if len(keep) >= params.target_layers:
            break
        keep.add(i)
    return sorted(keep)


def score(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    params: ScoreStage,
    on_step: Callable[[], None] | None = None,
    matrix_fn: Callable[[Sequence[int]], torch.Tensor] | None = None,
) -> ScoreResult:
    """Importance (or the criterion's matrix), aggregate and kept layers. `matrix_fn(removed)`
    replaces the local computation (the stage passes one that combines all processes'
    shares)."""
    num_layers = len(model.transformer_blocks)
    if params.target_layers >= num_layers:
        raise ValueError(
            f"targetLayers ({params.target_layers}) is not below the teacher's {num_layers} layers"
        )
    if params.criterion in PATTERNS:
        zeros = [[0.0] * len(params.timesteps) for _ in range(num_layers)]
        return ScoreResult(
            list(params.timesteps), zeros, [0.0] * num_layers, pattern(num_layers, params)
        )
    if matrix_fn is None:

        def matrix_fn(removed):
            return MATRICES[params.criterion](
                model, batches, params.timesteps, params.seed, removed, on_step=on_step
            )

    matrix = matrix_fn(())
    scores = aggregate(matrix, params)
    removal_order: list[int] = []
    spans: list[list[int]] = []
    if params.mode == "one-shot" and params.selection == "spans":
        spans, keep = partition(scores.tolist(), params)
    elif params.mode == "iterative":
        guard = protected(num_layers, params)
        current = scores
        while num_layers - len(removal_order) > params.target_layers:
            candidates = [i for i in range(num_layers) if i not in removal_order and i not in guard]
            removal_order.append(min(candidates, key=lambda i: (float(current[i]), i)))
            if num_layers - len(removal_order) > params.target_layers:
                current = aggregate(matrix_fn(removal_order), params)
        keep = sorted(set(range(num_layers)) - set(removal_order))
    else:
        keep = select(scores, params)
    return ScoreResult(
        timesteps=list(params.timesteps),
        matrix=matrix.tolist(),
        aggregate=scores.tolist(),
        keep=keep,
        removal_order=removal_order,
        spans=spans,
    )


def heatmap(
    result: ScoreResult,
    path: Path,
    title: str = "direct effect: velocity change without the block's update",
) -> Path:
    """Importance per layer and timestep, with the aggregate and the kept layers beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = torch.tensor(result.matrix)
    layers = matrix.shape[0]
    fig, (ax, bar) = plt.subplots(
        1, 2, figsize=(9, max(3, 0.22 * layers + 1.5)), width_ratios=[3, 1], sharey=True
    )
    image = ax.imshow(matrix.numpy(), aspect="auto", cmap="magma", origin="upper")
    ax.set_xticks(range(len(result.timesteps)), [f"{t:g}" for t in result.timesteps])
    ax.set_xlabel("timestep t")
    ax.set_ylabel("teacher block")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.04)
    colors = ["tab:green" if i in set(result.keep) else "tab:gray" for i in range(layers)]
    bar.barh(range(layers), result.aggregate, color=colors)
    bar.set_xlabel("aggregate")
    bar.set_title(f"kept: {len(result.keep)}/{layers}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
