"""Hybrid-stream conversion (brief section 3, "fuse"): dual-stream blocks -> single-stream.

`convert` turns the deepest blocks of a model into `AmberSingleStreamBlock`s initialised from
each block's image branch (text-branch weights are dropped). It is a pure model -> new model
function; progressive fusion calls it once per phase with a growing count.
"""

from __future__ import annotations

import torch

from amber_trainer import models
from amber_trainer.hybrid import TEXT_BRANCH_PREFIXES, AmberHybridTransformer2DModel


def phases(single_layers: int, blocks_per_phase: int, already: int = 0) -> list[int]:
    """Single-stream counts after each phase, deepest blocks first: e.g. 5, 2 -> [2, 4, 5]."""
    counts = list(range(already + blocks_per_phase, single_layers, blocks_per_phase))
    return [*counts, single_layers] if single_layers > already else []


@torch.no_grad()
def convert(model: torch.nn.Module, single_layers: int) -> AmberHybridTransformer2DModel:
    """A hybrid model whose deepest `single_layers` blocks are single-stream."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    total = config["num_layers"]
    already = config.get("num_single_layers", 0)
    if not already <= single_layers <= total:
        raise ValueError(
            f"single_layers={single_layers} must be between the model's current "
            f"{already} single-stream blocks and its {total} blocks"
        )
    first_single = total - single_layers
    hybrid = models.build_empty({**config, "num_single_layers": single_layers})
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("transformer_blocks."):
            index, local = name.removeprefix("transformer_blocks.").split(".", 1)
            if int(index) >= first_single and local.startswith(TEXT_BRANCH_PREFIXES):
                continue  # a converted block keeps only its image branch
        state[name] = tensor.clone()
    hybrid.load_state_dict(state, assign=True, strict=True)
    return hybrid.to(next(model.parameters()).device)
