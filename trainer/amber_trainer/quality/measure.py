"""How good a model is on the task: the judge's score on held-out prompts, and how far its
velocity is from the teacher's per timestep bucket."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amber_trainer.data import Batch
from amber_trainer.generate import euler
from amber_trainer.quality import judge as judging
from amber_trainer.quality import task, text
from amber_trainer.stages.eval import velocity_errors

# Euler steps per image, the same for every model (the teacher: 94.9% at 10, 94.2% at 20).
SAMPLE_STEPS = 10
SHIFT = 1.0  # 64 tokens: no resolution-dependent time shift
BUCKETS = 5


@dataclass
class Suite:
    """Held-out prompts with fixed sampling noise, and real renderings of the same scenes."""

    scenes: list[task.Scene]
    batch: Batch  # latents = the real renderings' tokens
    noise: torch.Tensor  # (n, 64, 48) sampling noise, one per prompt

    def __len__(self) -> int:
        return len(self.scenes)

    def subset(self, indices: list[int]) -> Suite:
        b = self.batch
        return Suite(
            [self.scenes[i] for i in indices],
            Batch(
                b.latents[indices],
                b.text[indices],
                b.text_mask[indices],
                [b.img_shapes[i] for i in indices],
            ),
            self.noise[indices],
        )


def suite(per_combination: int = 2, seed: int = 0, limit: int | None = None) -> Suite:
    """Every held-out combination `per_combination` times (each with its own rendering and
    noise); `limit` keeps an evenly spread subset (short runs)."""
    _, held = task.split()
    scenes = [s for s in held for _ in range(per_combination)]
    if limit is not None and limit < len(scenes):
        scenes = [scenes[round(i * len(scenes) / limit)] for i in range(limit)]
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 2**31, (len(scenes),), generator=gen).tolist()
    images = torch.stack([task.render(s, r) for s, r in zip(scenes, seeds, strict=True)])
    emb, mask = text.encode_unique([s.caption for s in scenes])
    batch = Batch(task.to_tokens(images), emb, mask, [[(1, task.SIDE, task.SIDE)]] * len(scenes))
    noise = torch.randn(batch.latents.shape, generator=gen)
    return Suite(scenes, batch, noise)


@torch.no_grad()
def generate(model: torch.nn.Module, s: Suite, steps: int = SAMPLE_STEPS) -> torch.Tensor:
    """(n, 3, 32, 32) images for the suite's prompts from its fixed noise."""
    tokens = euler(model.eval(), s.batch, s.noise, steps, shift=SHIFT)
    return task.to_images(tokens).clamp(-1, 1)


@torch.no_grad()
def evaluate(model, teacher, judge: judging.Judge, s: Suite) -> dict:
    """Score, per-attribute accuracy and per-bucket velocity error against the teacher."""
    images = generate(model, s)
    grade = judging.grade(judge, images, s.scenes)
    rel, _, _ = velocity_errors(
        teacher, model, [s.batch], BUCKETS, torch.Generator().manual_seed(1)
    )
    return {
        "score": grade["score"],
        "attributes": grade["attributes"],
        "velocityError": (rel / len(s)).tolist(),
    }
