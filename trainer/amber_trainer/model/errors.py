"""How far a student's velocity is from its teacher's, per timestep bucket: the eval stage's
table and the quality benchmark's velocity-error column."""

from __future__ import annotations

import torch

from amber_trainer import data
from amber_trainer.model.forward import velocity


@torch.no_grad()
def velocity_errors(teacher, student, batches, buckets: int, gen: torch.Generator, on_batch=None):
    """Sums over samples, per timestep bucket, of: the student's velocity error relative to
    the teacher's, and each model's flow-matching MSE. Each sample gets one time inside each
    bucket, drawn from `gen`: comparable across models and runs."""
    rel = torch.zeros(buckets, dtype=torch.float64)
    fm_student = torch.zeros(buckets, dtype=torch.float64)
    fm_teacher = torch.zeros(buckets, dtype=torch.float64)
    for step, batch in enumerate(batches):
        for b in range(buckets):
            t = (b + torch.rand(len(batch), generator=gen)) / buckets
            x, target = data.noised(batch, t, gen)
            v_teacher = velocity(teacher, x).double()
            v_student = velocity(student, x).double()
            diff = (v_student - v_teacher).flatten(1).norm(dim=1)
            rel[b] += (diff / v_teacher.flatten(1).norm(dim=1).clamp_min(1e-12)).sum().item()
            fm_student[b] += (v_student - target).pow(2).flatten(1).mean(1).sum().item()
            fm_teacher[b] += (v_teacher - target).pow(2).flatten(1).mean(1).sum().item()
        if on_batch:
            on_batch(step + 1)
    return rel, fm_student, fm_teacher
