"""Timestep-sensitive layer importance (brief section 3, "score").

For each timestep t and calibration pair (x0, c) the input is x_t = (1-t)·x0 + t·ε. Block i's
importance at t is the relative error ||v_skip_i - v|| / ||v|| between the teacher's velocity
with block i replaced by the identity and the full teacher's, averaged over the calibration
set. Columns are normalised per timestep (so that late, low-error timesteps count as much as
early ones) and aggregated with a max (a layer critical at any timestep survives) or a
weighted mean.

Baselines for ablation (`criterion`): block influence (ShortGPT: 1 - cosine similarity of a
block's input and output states, both streams, through the same normalise-and-aggregate)
and fixed patterns that look at no data (evenly spaced, the first N, seeded random, or an
explicit list).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from amber.stages import ScoreStage
from amber_trainer.data import Batch
from amber_trainer.forward import embed, head, run_block, run_blocks


@dataclass
class ScoreResult:
    timesteps: list[float]
    matrix: list[list[float]]  # [layer][timestep] relative error of the full model
    aggregate: list[float]  # per layer, after normalisation and aggregation
    keep: list[int]  # sorted teacher indices that survive
    removal_order: list[int] = field(default_factory=list)  # iterative mode, first removed first

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
def importance_matrix(
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


MATRICES = {"importance": importance_matrix, "block-influence": influence_matrix}
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


def aggregate(matrix: torch.Tensor, params: ScoreStage) -> torch.Tensor:
    """Per-layer importance from the (layers, timesteps) matrix."""
    m = matrix.clone()
    if params.normalize:
        m = m / m.max(dim=0, keepdim=True).values.clamp_min(1e-12)
    if params.aggregate == "max":
        return m.max(dim=1).values
    weights = torch.tensor(params.timestep_weights or [1.0] * m.shape[1], dtype=m.dtype)
    return (m * weights).sum(dim=1) / weights.sum().clamp_min(1e-12)


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
    if params.mode == "iterative":
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
    )


def heatmap(
    result: ScoreResult,
    path: Path,
    title: str = "relative velocity error when the block is skipped",
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
