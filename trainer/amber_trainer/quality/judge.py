"""The judge: a small CNN that reads every attribute of a task image.

It is trained on rendered images of *all* combinations (it is the measuring instrument,
not the model under test) with light noise and blur, so that slightly soft generated
images are read as a person would read them. A prompt counts as passed when every
attribute its caption asks for is read back (GenEval's rule); per-attribute accuracy is
reported beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amber_trainer.quality import task

HEADS = {
    "count": 2,
    "shape": len(task.SHAPES),
    "colour": len(task.COLOURS),
    "size": len(task.SIZES),
    "position": len(task.POSITIONS),
    "shape2": len(task.SHAPES),
    "colour2": len(task.COLOURS),
}
# Which heads each reported attribute is read from (the second object's shape is a shape).
ATTRIBUTE_HEADS = {
    "count": ("count",),
    "shape": ("shape", "shape2"),
    "colour": ("colour", "colour2"),
    "size": ("size",),
    "position": ("position",),
}


class Judge(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()

        def conv(i, o, stride):
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.BatchNorm2d(o), nn.ReLU())

        self.trunk = nn.Sequential(
            conv(3, width, 1),
            conv(width, width, 2),  # 16x16
            conv(width, 2 * width, 1),
            conv(2 * width, 2 * width, 2),  # 8x8
            conv(2 * width, 2 * width, 1),
            nn.Flatten(),
            nn.Linear(2 * width * 64, 256),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(256, n) for name, n in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(images)
        return {name: head(features) for name, head in self.heads.items()}


def targets(scenes: list[task.Scene]) -> dict[str, torch.Tensor]:
    rows = [task.labels(s) for s in scenes]
    return {name: torch.tensor([r[name] for r in rows]) for name in HEADS}


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise and a random blur: what a sampler's output looks like next to a rendering."""
    noise = torch.randn(images.shape, generator=gen) * 0.08
    weight = torch.rand(images.shape[0], 1, 1, 1, generator=gen) * 0.6
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    return ((1 - weight) * images + weight * blurred + noise).clamp(-1, 1)


def train(images, scenes, steps: int = 1500, batch: int = 128, seed: int = 0, log=print) -> Judge:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    judge = Judge()
    labels = targets(scenes)
    opt = torch.optim.AdamW(judge.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    judge.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        out = judge(augment(images[idx], gen))
        loss = sum(F.cross_entropy(out[name], labels[name][idx], ignore_index=-1) for name in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"judge step {step + 1}/{steps}: loss {loss.item():.4f}")
    return judge.eval()


@torch.no_grad()
def read(judge: Judge, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The judge's reading of each image, head by head."""
    return {name: logits.argmax(-1) for name, logits in judge(images.clamp(-1, 1)).items()}


@torch.no_grad()
def grade(judge: Judge, images: torch.Tensor, scenes: list[task.Scene]) -> dict:
    """GenEval-style score: the fraction of images showing every requested attribute, and
    per-attribute accuracy over the images that ask for it. The soft score is the judge's
    mean log-probability of the requested values (per prompt, then averaged): it moves
    before a prompt flips from failed to passed."""
    logits = judge(images.clamp(-1, 1))
    seen = {name: out.argmax(-1) for name, out in logits.items()}
    want = targets(scenes)
    log_p, asked_heads = torch.zeros(len(scenes)), torch.zeros(len(scenes))
    for name in HEADS:
        asked = want[name] >= 0
        picked = logits[name].log_softmax(-1).gather(1, want[name].clamp_min(0)[:, None])[:, 0]
        log_p += torch.where(asked, picked, 0.0)
        asked_heads += asked.float()
    soft = log_p / asked_heads
    count_ok = seen["count"] == want["count"]
    per_head = {}
    for name in HEADS:
        asked = want[name] >= 0
        # An attribute of an object the judge did not count there is not shown.
        per_head[name] = torch.where(asked, (seen[name] == want[name]) & count_ok, True)
    passed = torch.stack(list(per_head.values())).all(0)
    attributes = {}
    for attribute, heads in ATTRIBUTE_HEADS.items():
        hits = sum(int(per_head[h][want[h] >= 0].sum()) for h in heads)
        total = sum(int((want[h] >= 0).sum()) for h in heads)
        attributes[attribute] = hits / max(1, total)
    return {
        "score": float(passed.float().mean()),
        "attributes": attributes,
        "passed": passed,
        "soft": float(soft.mean()),
        "softPerPrompt": soft,
    }
