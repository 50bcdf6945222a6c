"""Training objectives as modules, so that DeepSpeed wraps exactly what is trained.

Each objective holds the student; the teacher's outputs arrive as inputs computed under
`torch.no_grad()`, so the teacher is never part of the optimised module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from amber_trainer.model.forward import FlowInputs, embed, head, run_block
from amber_trainer.model.generate import time_shift


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Hidden states grow with depth; normalising by the target's power weighs blocks equally.
    return F.mse_loss(pred, target) / target.pow(2).mean().clamp_min(1e-8)


def per_token_mse(
    pred: torch.Tensor, target: torch.Tensor, outlier_sigma: float = 0.0
) -> torch.Tensor:
    """Mean over tokens of each token's squared error divided by its target's power, so a
    token with a huge activation counts as much as any other; with `outlier_sigma` > 0,
    tokens whose error is that many standard deviations above the batch mean are left out
    (they are the few whose errors would otherwise steer the whole loss)."""
    err = (pred - target).pow(2).mean(-1) / target.pow(2).mean(-1).clamp_min(1e-8)  # (B, N)
    if outlier_sigma > 0 and err.numel() > 1:
        with torch.no_grad():
            keep = err <= err.mean() + outlier_sigma * err.std()
        return (err * keep).sum() / keep.sum().clamp_min(1)
    return err.mean()


def _block(block, img, txt, cond, use_checkpoint: bool):
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(run_block, block, img, txt, cond, use_reentrant=False)
    return run_block(block, img, txt, cond)


@torch.no_grad()
def teacher_states(
    teacher: nn.Module, x: FlowInputs, boundaries: Sequence[int]
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Teacher (img, txt) entering each block in `boundaries` (len(blocks) = after the last),
    and its velocity."""
    wanted = set(boundaries)
    img, txt, cond = embed(teacher, x)
    states = {}
    for i, block in enumerate(teacher.transformer_blocks):
        if i in wanted:
            states[i] = (img, txt)
        img, txt = run_block(block, img, txt, cond)
    states[len(teacher.transformer_blocks)] = (img, txt)
    return states, head(teacher, img, cond)


class Objective(nn.Module):
    """What the training loop relies on in an objective: the model it trains (`student`:
    compiled block by block on GPUs, followed by a moving average, saved by the stage),
    `activation_checkpointing` (set from the resource's DeepSpeed settings before training)
    and `forward(*inputs) -> (loss, parts)`: the scalar to minimise and a detached vector of
    its parts (per block, or per term) for the loss history."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student
        self.activation_checkpointing = False


class LayerwiseDistillation(Objective):
    """Student block j reproduces the teacher's hidden states at the end of its span.

    `spans[j] = (first, last)` teacher blocks. Mode `local` feeds block j the teacher's input
    to its span (blocks learn independently) and trains only blocks that stand for more
    than one teacher block (a one-block span starts as an exact copy: nothing to learn);
    `global` runs the student on its own states and adds `output_weight` x the velocity
    loss. `feature_loss` is `per-token` (`per_token_mse`, outliers beyond `outlier_sigma`
    masked) or `relative`; `text_weights[j]` weighs block j's text-stream loss (default 1).
    """

    def __init__(
        self,
        student: nn.Module,
        spans,
        mode: str,
        output_weight: float = 1.0,
        feature_loss: str = "relative",
        outlier_sigma: float = 0.0,
        text_weights: Sequence[float] | None = None,
    ):
        super().__init__(student)
        self.spans = [tuple(s) for s in spans]
        self.mode = mode
        self.output_weight = output_weight
        self.feature_loss = feature_loss
        self.outlier_sigma = outlier_sigma
        self.text_weights = list(text_weights or [1.0] * len(self.spans))

    def boundaries(self) -> list[int]:
        return sorted({a for a, _ in self.spans} | {b + 1 for _, b in self.spans})

    def _feature(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.feature_loss == "per-token":
            return per_token_mse(pred, target, self.outlier_sigma)
        return relative_mse(pred, target)

    def forward(self, x: FlowInputs, states: dict, teacher_velocity: torch.Tensor):
        blocks = self.student.transformer_blocks
        img, txt, cond = embed(self.student, x)
        losses = []
        for j, (first, last) in enumerate(self.spans):
            if self.mode == "local":
                if first == last:
                    losses.append(img.new_zeros(()))
                    continue
                img, txt = states[first]
            img, txt = _block(blocks[j], img, txt, cond, self.activation_checkpointing)
            target_img, target_txt = states[last + 1]
            loss = self._feature(img, target_img)
            if self.text_weights[j] > 0:
                loss = loss + self.text_weights[j] * self._feature(txt, target_txt)
            losses.append(loss)
        per_block = torch.stack(losses)  # (student blocks,)
        loss = per_block.sum()
        if self.mode == "global" and self.output_weight > 0:
            loss = loss + self.output_weight * F.mse_loss(
                head(self.student, img, cond), teacher_velocity
            )
        return loss, per_block.detach()


def sample_timesteps(kind: str, n: int, gen: torch.Generator, mean=0.0, std=1.0, shift=3.0):
    """Training times t in (0, 1) as the teacher's scheduler would draw them."""
    if kind == "logit-normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=gen))
    u = torch.rand(n, generator=gen)
    if kind == "shifted":
        return time_shift(u, shift)
    return u


class FlowMatching(Objective):
    """μ·||v_θ(x_t, t, c) - (ε - x0)||² + λ·||v_θ - v_teacher||² (μ = `flow_weight`,
    λ = `distill_weight`; the second term only with a teacher's velocity)."""

    def __init__(self, student: nn.Module, distill_weight: float = 0.0, flow_weight: float = 1.0):
        super().__init__(student)
        self.distill_weight = distill_weight
        self.flow_weight = flow_weight

    def forward(self, x: FlowInputs, target: torch.Tensor, teacher_velocity: torch.Tensor | None):
        img, txt, cond = embed(self.student, x)
        for block in self.student.transformer_blocks:
            img, txt = _block(block, img, txt, cond, self.activation_checkpointing)
        v = head(self.student, img, cond)  # (B, N, C)
        flow = F.mse_loss(v, target)
        loss = self.flow_weight * flow
        if teacher_velocity is not None and self.distill_weight > 0:
            loss = loss + self.distill_weight * F.mse_loss(v, teacher_velocity)
        return loss, flow.detach()[None]
