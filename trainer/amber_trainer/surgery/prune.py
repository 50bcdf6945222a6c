"""Depth pruning with weight re-initialisation (docs/design.md, "prune").

Every student block stands for a contiguous run of teacher blocks, its *span*: the score
stage's partition (`selection: spans`) or, without one, each kept block with the removed
blocks nearest to it (ties go to the preceding one). Distillation teaches student block j
to map the teacher's input of span j to the teacher's output of it.

A student block starts as a copy of its span's representative block (`init:
representative`; `representative` is the one rule, shared with the score stage's
partition), as the average of the span's blocks (uniformly or weighted by importance), or
as a copy of the kept block (`keep`). The teacher's last block feeds the output head and is
never averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from diffusers import QwenImageTransformer2DModel

from amber_trainer.model import models


@dataclass
class LayerMapEntry:
    student: int  # student block index
    teacher: int  # the kept teacher block it descends from
    span: tuple[int, int]  # first and last teacher block it stands for (inclusive)
    sources: list[int]  # teacher blocks averaged into it
    weights: list[float]  # their averaging weights


LONG_SPAN = 3  # spans longer than this are represented by their middle block


def representative(blocks: Sequence[int], importance: Sequence[float] | None) -> int:
    """The block that stands for a span: its most important one (the first of equals, and
    the first block when nothing was measured), or its middle one for a long span, whose
    ends are too far from each other for any end-heavy block to stand in for both."""
    blocks = list(blocks)
    if len(blocks) > LONG_SPAN:
        return blocks[len(blocks) // 2]
    if importance is None:
        return blocks[0]
    return max(blocks, key=lambda i: (float(importance[i]), -i))


def assign(keep: Sequence[int], num_layers: int) -> dict[int, list[int]]:
    """Kept block -> the teacher blocks it stands for (itself and its nearest removed ones)."""
    keep = sorted(keep)
    if not keep or keep[0] < 0 or keep[-1] >= num_layers or len(set(keep)) != len(keep):
        raise ValueError(f"keep {keep} is not a set of block indices below {num_layers}")
    groups: dict[int, list[int]] = {k: [] for k in keep}
    for layer in range(num_layers):
        # min() takes the first of equals, and `keep` is ascending: ties go to the preceding.
        nearest = min(keep, key=lambda k: abs(k - layer))
        groups[nearest].append(layer)
    return groups


def groups_of(
    keep: Sequence[int], num_layers: int, spans: Sequence[Sequence[int]] | None
) -> dict[int, list[int]]:
    """Kept block -> its span's blocks: the given `spans` (one kept block in each, and
    together every teacher block once), or the nearest assignment."""
    if not spans:
        return assign(keep, num_layers)
    covered = [i for a, b in spans for i in range(a, b + 1)]
    if covered != list(range(num_layers)) or len(spans) != len(keep):
        raise ValueError(f"spans {spans} do not cover the teacher's {num_layers} blocks once")
    groups = {}
    for k, (a, b) in zip(sorted(keep), spans, strict=True):
        if not a <= k <= b:
            raise ValueError(f"kept block {k} is outside its span [{a}, {b}]")
        groups[k] = list(range(a, b + 1))
    return groups


def layer_map(
    keep: Sequence[int],
    num_layers: int,
    init: str,
    importance: Sequence[float] | None = None,
    spans: Sequence[Sequence[int]] | None = None,
) -> list[LayerMapEntry]:
    groups = groups_of(keep, num_layers, spans)
    last = num_layers - 1
    measured = importance is not None and any(float(v) for v in importance)
    entries = []
    for j, k in enumerate(sorted(keep)):
        group = groups[k]
        span = (group[0], group[-1])
        if init == "keep":
            sources, weights = [k], [1.0]
        elif last in group:  # the block that feeds the head is copied, never mixed
            sources, weights = [last], [1.0]
        elif init == "representative":
            # a partition's kept blocks are its representatives already
            rep = representative(group, importance) if measured and not spans else k
            sources, weights = [rep], [1.0]
        elif init == "average":
            sources = group
            weights = [1.0 / len(sources)] * len(sources)
        elif init == "importance-weighted":
            if importance is None:
                raise ValueError("init importance-weighted needs the score stage's importance")
            sources = group
            raw = [max(0.0, float(importance[s])) for s in sources]
            total = sum(raw)
            weights = [r / total for r in raw] if total > 0 else [1 / len(raw)] * len(raw)
        else:
            raise ValueError(f"unknown init {init!r}")
        entries.append(LayerMapEntry(j, k, span, sources, weights))
    return entries


@torch.no_grad()
def prune(
    teacher: QwenImageTransformer2DModel, entries: Sequence[LayerMapEntry]
) -> QwenImageTransformer2DModel:
    """A new, smaller model of the teacher's class whose blocks follow `entries`."""
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    config["num_layers"] = len(entries)
    student = models.build_empty(config)
    state = {}
    teacher_state = teacher.state_dict()
    for name, tensor in teacher_state.items():
        if not name.startswith("transformer_blocks."):
            state[name] = tensor.clone()
    blocks = teacher.transformer_blocks
    for entry in entries:
        sources = [blocks[s].state_dict() for s in entry.sources]
        for name in sources[0]:
            mixed = sum(
                w * src[name].double() for w, src in zip(entry.weights, sources, strict=True)
            )
            state[f"transformer_blocks.{entry.student}.{name}"] = mixed.to(sources[0][name].dtype)
    student.load_state_dict(state, assign=True, strict=True)
    return student.to(teacher.device)


def entries_to_json(entries: Sequence[LayerMapEntry]) -> list[dict]:
    return [asdict(e) for e in entries]
