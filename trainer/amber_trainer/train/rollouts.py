"""The student's own sampling trajectories, for on-policy distillation (`onPolicyFraction`).

Noised training rows x_t = (1-t)·x0 + t·ε show the student only states on the data's path.
At sampling time it walks its own path, and each step's small error moves the next input
off the one it was trained on: on the benchmark a student that errs at a single sampler step
loses almost nothing, one that samples alone loses five times the sum of those losses. Training
on the states of its own Euler trajectories, against the frozen teacher's velocity there,
teaches it to steer back (the idea of DAgger, applied to a sampler).

A trajectory costs one student forward per training micro-batch, not one rollout: `size`
trajectories advance one Euler step per micro-batch with the current weights, start at
evenly spread steps so every sampler time is present in every batch, and begin again from
fresh noise and a fresh caption when they reach t = 0. Their state goes into checkpoints,
so a resumed stage trains on the same states as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from amber_trainer.data import TensorDataset
from amber_trainer.model.forward import FlowInputs
from amber_trainer.model.generate import schedule

Velocity = Callable[[FlowInputs], torch.Tensor]


class Rollouts:
    """`size` Euler trajectories of `steps` steps (time shift `shift`) over captions of the
    training rows; `seed` and `rank` make each trajectory's noise and caption reproducible."""

    def __init__(self, size: int, steps: int, shift: float, seed: int, rank: int = 0):
        self.size = size
        self.steps = steps
        self.times = schedule(steps, shift)
        self.seed = seed
        self.rank = rank
        self.x: torch.Tensor | None = None  # (size, N, C) current states, fp32
        self.step = torch.zeros(size, dtype=torch.long)  # sampler step each one is at
        self.row = torch.zeros(size, dtype=torch.long)  # the training row giving its caption
        self.episode = torch.zeros(size, dtype=torch.long)  # trajectories it has begun

    def _begin(self, slot: int, train: TensorDataset) -> tuple[int, torch.Tensor]:
        # One generator per (slot, episode): the same trajectory whatever came before it.
        key = (((self.seed * 1_000_003 + self.rank) * 1_000_003 + slot) * 1_000_003) + int(
            self.episode[slot]
        )
        gen = torch.Generator().manual_seed(key % 2**63)
        row = int(torch.randint(0, len(train), (), generator=gen))
        return row, torch.randn(train.latents.shape[1:], generator=gen)

    def _inputs(self, train: TensorDataset, device) -> FlowInputs:
        batch = train.rows(self.row.tolist(), device)
        t = torch.tensor([self.times[int(k)] for k in self.step], device=device)
        return FlowInputs(self.x.to(device), batch.text, batch.text_mask, t, batch.img_shapes)

    @torch.no_grad()
    def _start(self, velocity: Velocity, train: TensorDataset, device) -> None:
        """Every trajectory from noise, walked by the student to its evenly spread start."""
        begun = [self._begin(i, train) for i in range(self.size)]
        self.row = torch.tensor([r for r, _ in begun])
        self.x = torch.stack([x for _, x in begun])
        target = torch.tensor([i * self.steps // self.size for i in range(self.size)])
        self.step = torch.zeros(self.size, dtype=torch.long)
        while bool((self.step < target).any()):
            moving = self.step < target
            self._advance(velocity(self._inputs(train, device)), moving)

    def _advance(self, v: torch.Tensor, moving: torch.Tensor) -> None:
        dt = torch.tensor([self.times[int(k) + 1] - self.times[int(k)] for k in self.step])
        dt = torch.where(moving, dt, torch.zeros_like(dt))
        self.x = self.x + dt[:, None, None] * v.detach().float().cpu()
        self.step = self.step + moving.long()

    @torch.no_grad()
    def draw(self, velocity: Velocity, train: TensorDataset, device=None) -> FlowInputs:
        """The trajectories' current states (a micro-batch's on-policy rows); each then
        takes one Euler step with `velocity` (the student's, now), and those that reach
        t = 0 begin again."""
        if self.x is None:
            self._start(velocity, train, device)
        inputs = self._inputs(train, device)
        self._advance(velocity(inputs), torch.ones(self.size, dtype=torch.bool))
        for slot in (self.step == self.steps).nonzero().flatten().tolist():
            self.episode[slot] += 1
            row, noise = self._begin(slot, train)
            self.row[slot], self.x[slot], self.step[slot] = row, noise, 0
        return inputs

    def state_dict(self) -> dict:
        return {
            "x": None if self.x is None else self.x.clone(),
            "step": self.step.clone(),
            "row": self.row.clone(),
            "episode": self.episode.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.x = None if state["x"] is None else state["x"].float().cpu()
        self.step, self.row, self.episode = state["step"], state["row"], state["episode"]
