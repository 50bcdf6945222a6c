"""What makes a GPU step fast, in one place: compiled blocks and a fused optimizer.

Blocks are compiled one by one (not the whole model): every block of a stage has the same
code and shapes, so one compiled graph serves all of them, the compile takes seconds, and
the layer-wise objectives can still call blocks individually.
"""

from __future__ import annotations

import torch
from torch import nn

from amber.api import DeepSpeedSpec


def should_compile(ds: DeepSpeedSpec, device: torch.device, zero_stage: int) -> bool:
    return device.type == "cuda" and ds.compiles(zero_stage)


def compile_blocks(model: nn.Module) -> nn.Module:
    """Compile each block in place; state-dict keys stay as they are."""
    for block in model.transformer_blocks:  # dual- and single-stream alike
        block.compile()
    return model


def optimizer_params(on_gpu: bool) -> dict:
    """torch's AdamW under DeepSpeed: fused on GPUs (one kernel for all tensors, nothing to
    build at start-up as DeepSpeed's own FusedAdam would), plain on CPUs."""
    return {"torch_adam": True, "fused": True} if on_gpu else {"torch_adam": True}
