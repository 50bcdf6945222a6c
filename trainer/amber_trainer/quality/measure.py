"""How good a model is on the task: the judge's verdict on held-out prompts (combinations
never trained on) and on training combinations, and how far its velocity is from the
teacher's per timestep bucket.

A `Suite` fixes everything but the model: scenes, their real renderings, the sampling noise
and the velocity-error inputs with the teacher's answers to them (computed once). Its seed
picks renderings and noise, so a benchmark seed changes the sampling noise too; models of one
seed are compared on the same suite, prompt by prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from amber_trainer import data
from amber_trainer.data import Batch
from amber_trainer.model.forward import velocity
from amber_trainer.model.generate import euler
from amber_trainer.quality import judge as judging
from amber_trainer.quality import task, text

# Euler steps per image, the same for every model.
SAMPLE_STEPS = 10
SHIFT = 1.0  # 64 tokens: no resolution-dependent time shift
BUCKETS = 5
HELD_OUT_RENDERS = 6  # per held-out combination: 414 prompts
TRAINING_PROMPTS = 138  # evenly spread over the training combinations (in-distribution)
# Velocity error is an average over many tokens per scene: its seed-to-seed spread was 0.001
# on all 414 held-out scenes, so one scene per held-out combination measures it as well.
ERROR_SCENES = 138
# Prompts sampled at once: a chunk's activations stay in the caches (`bench/sampling.py`:
# x1.13-1.22 alone on one core; three processes sharing two cores gained nothing
# measurable in the full run). Every image is the same either way.
GENERATE_CHUNK = 69
MEASUREMENT = 3  # what a measurement holds; saved results of another one are not reused


@dataclass
class Suite:
    """Prompts with fixed sampling noise, and real renderings of the same scenes."""

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


@dataclass
class Errors:
    """Velocity-error inputs, one x_t per scene and bucket, with the teacher's velocity."""

    inputs: list  # per bucket: FlowInputs
    teacher: list[torch.Tensor]  # per bucket: the teacher's velocity


@dataclass
class Suites:
    """What a model is measured on: held-out prompts, training prompts, error inputs."""

    held_out: Suite
    training: Suite
    errors: Errors
    seed: int

    def held_out_subset(self, count: int) -> Suites:
        """The same suites with `count` held-out prompts evenly spread over the suite's."""
        picks = _spread(list(range(len(self.held_out))), count)
        return replace(self, held_out=self.held_out.subset(picks))


def _spread(scenes: list, limit: int | None) -> list:
    if limit is None or limit >= len(scenes):
        return scenes
    return [scenes[round(i * len(scenes) / limit)] for i in range(limit)]


def suite(
    per_combination: int = HELD_OUT_RENDERS,
    seed: int = 0,
    limit: int | None = None,
    scenes: list[task.Scene] | None = None,
) -> Suite:
    """`scenes` (default: every held-out combination) `per_combination` times, each with its
    own rendering and noise; `limit` keeps an evenly spread subset (short runs)."""
    chosen = scenes if scenes is not None else task.split()[1]
    chosen = _spread([s for s in chosen for _ in range(per_combination)], limit)
    gen = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 2**31, (len(chosen),), generator=gen).tolist()
    images = torch.stack([task.render(s, r) for s, r in zip(chosen, seeds, strict=True)])
    emb, mask = text.encode_unique([s.caption for s in chosen])
    batch = Batch(task.to_tokens(images), emb, mask, [[(1, task.SIDE, task.SIDE)]] * len(chosen))
    noise = torch.randn(batch.latents.shape, generator=gen)
    return Suite(chosen, batch, noise)


@torch.no_grad()
def errors(teacher, s: Suite, seed: int, buckets: int = BUCKETS) -> Errors:
    """One time inside each bucket per scene (as `model.errors.velocity_errors` draws them),
    and the teacher's velocity there: every model is compared with the same answers."""
    gen = torch.Generator().manual_seed(seed)
    inputs, answers = [], []
    for b in range(buckets):
        t = (b + torch.rand(len(s), generator=gen)) / buckets
        x, _ = data.noised(s.batch, t, gen)
        inputs.append(x)
        answers.append(velocity(teacher.eval(), x))
    return Errors(inputs, answers)


def suites(teacher, seed: int, held_out_limit: int | None = None, training_limit=None) -> Suites:
    """The benchmark's suites for one seed."""
    train, _ = task.split()
    return Suites(
        held_out=(held := suite(seed=seed, limit=held_out_limit)),
        training=suite(1, seed + 1, training_limit or TRAINING_PROMPTS, scenes=train),
        errors=errors(
            teacher, held.subset(_spread(list(range(len(held))), ERROR_SCENES)), seed + 2
        ),
        seed=seed,
    )


@torch.no_grad()
def generate(model: torch.nn.Module, s: Suite, steps: int = SAMPLE_STEPS) -> torch.Tensor:
    """(n, 3, 32, 32) images for the suite's prompts from its fixed noise, sampled
    `GENERATE_CHUNK` prompts at a time."""
    parts = []
    for start in range(0, len(s), GENERATE_CHUNK):
        chunk = s.subset(list(range(start, min(start + GENERATE_CHUNK, len(s)))))
        parts.append(euler(model.eval(), chunk.batch, chunk.noise, steps, shift=SHIFT))
    return task.to_images(torch.cat(parts)).clamp(-1, 1)


@torch.no_grad()
def grid(s: Suite, models: dict[str, torch.nn.Module], path, rows: int = 8) -> None:
    """`rows` prompts spread over the suite, one row each: the real rendering, then each
    model's picture from the same noise (columns named as `models` is keyed)."""
    from amber_trainer.quality import report

    picks = s.subset([round(i * len(s) / rows) for i in range(rows)])
    columns = {"real": task.to_images(picks.batch.latents)}
    columns.update({name: generate(model, picks) for name, model in models.items()})
    report.sample_grid(columns, [scene.caption for scene in picks.scenes], path)


@torch.no_grad()
def velocity_error(model, e: Errors) -> list[float]:
    """Mean ||v - v_teacher|| / ||v_teacher|| per bucket."""
    out = []
    for x, answer in zip(e.inputs, e.teacher, strict=True):
        diff = (velocity(model.eval(), x) - answer).double().flatten(1).norm(dim=1)
        out.append(float((diff / answer.double().flatten(1).norm(dim=1).clamp_min(1e-12)).mean()))
    return out


def _bits(passed: torch.Tensor) -> str:
    return "".join("1" if p else "0" for p in passed.tolist())


@torch.no_grad()
def evaluate(model, judge: judging.Judge, s: Suites, full: bool = True) -> dict:
    """Held-out score, soft score and attributes, and the per-prompt verdicts that paired
    intervals are computed from; `full` adds the in-distribution score and the velocity
    error per bucket (an arm's model right after pruning needs only the held-out score)."""
    held = judging.grade(judge, generate(model, s.held_out), s.held_out.scenes)
    out = {
        "score": held["score"],
        "softScore": held["soft"],
        "attributes": held["attributes"],
        "passed": _bits(held["passed"]),
        "softPerPrompt": [round(v, 4) for v in held["softPerPrompt"].tolist()],
        "full": full,
    }
    if full:
        seen = judging.grade(judge, generate(model, s.training), s.training.scenes)
        out["trainingScore"] = seen["score"]
        out["velocityError"] = velocity_error(model, s.errors)
    return out
