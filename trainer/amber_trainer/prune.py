"""Depth pruning with local weight averaging (brief section 3, "prune").

Each removed block is assigned to its nearest kept block (ties go to the preceding one). A
kept block is re-initialised as the average of its own weights and those assigned to it,
uniformly or weighted by importance; `init: keep` copies it unchanged. Nearest assignment
makes every kept block own a contiguous run of teacher blocks, its *span*: distillation
teaches student block j to map the teacher's input of span j to the teacher's output of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from diffusers import QwenImageTransformer2DModel

from amber_trainer import models


@dataclass
class LayerMapEntry:
    student: int  # student block index
    teacher: int  # the kept teacher block it descends from
    span: tuple[int, int]  # first and last teacher block it stands for (inclusive)
    sources: list[int]  # teacher blocks averaged into it
    weights: list[float]  # their averaging weights


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


def layer_map(
    keep: Sequence[int], num_layers: int, init: str, importance: Sequence[float] | None = None
) -> list[LayerMapEntry]:
    groups = assign(keep, num_layers)
    entries = []
    for j, k in enumerate(sorted(keep)):
        span = (groups[k][0], groups[k][-1])
        if init == "keep":
            sources, weights = [k], [1.0]
        elif init == "average":
            sources = groups[k]
            weights = [1.0 / len(sources)] * len(sources)
        elif init == "importance-weighted":
            if importance is None:
                raise ValueError("init importance-weighted needs the score stage's importance")
            sources = groups[k]
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


def entries_from_json(data: list[dict]) -> list[LayerMapEntry]:
    return [LayerMapEntry(**{**d, "span": tuple(d["span"])}) for d in data]
