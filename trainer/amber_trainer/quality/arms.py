"""The benchmark's runs: the amber-10b and amber-6b presets and one ablation per arm, each
an `AmberCompression` run by `amber run`'s own code path. amber-6b is amber-10b plus fusion,
so its finetune stage is the amber-10b model (the same spec hash: one run serves both).

An arm changes one thing against the preset and keeps every other stage and budget; arms
of one seed share the stages they have in common (the committed output is copied, and
`amber run` reuses it because the stage's spec hash matches).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from amber import presets
from amber.api import AmberCompression
from amber.local import run_resource
from amber.plan import MODEL_STAGES, OUTPUT, plan
from amber_trainer.quality import task

# What each arm changes; the first two are the presets themselves.
ARMS = {
    "amber-6b": "the preset: importance, average, distill + finetune, progressive fusion",
    "amber-10b": "the preset: the same stages as amber-6b up to finetune, no fusion",
    "uniform": "score.criterion: uniform (evenly spaced layers)",
    "first": "score.criterion: first (keep the first N layers)",
    "block-influence": "score.criterion: block-influence (ShortGPT cosine)",
    "random": "score.criterion: random",
    "init-keep": "prune.init: keep (no weight averaging)",
    "finetune-only": "no distill stage; finetune gets its steps",
    "one-shot-fusion": "fuse: every block in one phase, same total steps",
    "broken": "random layers, no averaging, no training (a pipeline that learns nothing)",
}


@dataclass(frozen=True)
class Budget:
    """Stage sizes for 2 CPU cores; every arm of a benchmark uses the same."""

    calibration_samples: int = 64
    distill_steps: int = 100
    finetune_steps: int = 100
    fuse_steps: int = 20  # per phase
    fuse_finetune_steps: int = 40
    micro_batch: int = 24
    learning_rate: float = 1e-3


def overrides(budget: Budget, seed: int) -> dict[str, dict]:
    train = {
        "microBatchSize": budget.micro_batch,
        "learningRate": budget.learning_rate,
        "warmupSteps": 10,
        "checkpointEvery": 10_000,
        "seed": seed,
    }
    return {
        "score": {"calibrationSamples": budget.calibration_samples, "batchSize": 16, "seed": seed},
        "distill": {**train, "steps": budget.distill_steps},
        "finetune": {**train, "steps": budget.finetune_steps},
        "fuse": {
            **train,
            "steps": budget.fuse_steps,
            "finetuneSteps": budget.fuse_finetune_steps,
        },
        "eval": {"samples": 64, "timestepBuckets": 5, "sampleSteps": 20, "seed": seed},
    }


def stages(arm: str, layers: int, budget: Budget, seed: int) -> list[dict]:
    """The arm's `spec.stages`: its preset's, with the arm's one change."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    preset = "amber-6b" if arm in ("amber-6b", "one-shot-fusion") else "amber-10b"
    fields = overrides(budget, seed)
    if preset == "amber-10b":
        del fields["fuse"]
    raw = {s.name: s.dump() for s in presets.build(preset, layers, fields)}
    names = list(raw)
    if arm in ("uniform", "first", "block-influence", "random"):
        raw["score"]["criterion"] = arm
    elif arm == "init-keep":
        raw["prune"]["init"] = "keep"
    elif arm == "finetune-only":
        names.remove("distill")
        raw["finetune"]["steps"] += raw["distill"]["steps"]
    elif arm == "one-shot-fusion":
        fuse = raw["fuse"]
        phases = -(-fuse["singleLayers"] // fuse["blocksPerPhase"])
        fuse["steps"] *= phases
        fuse["blocksPerPhase"] = fuse["singleLayers"]
    elif arm == "broken":
        raw["score"]["criterion"] = "random"
        raw["prune"]["init"] = "keep"
        names = ["score", "prune"]
    if arm not in ("amber-6b", "amber-10b", "one-shot-fusion"):
        names = [n for n in names if n != "eval"]  # ablations are judged, not eval'd
    return [raw[n] for n in names]


def resource(
    arm: str, seed: int, teacher_uri: str, data_uri: str, store_uri: str, budget: Budget
) -> AmberCompression:
    from amber_trainer.quality import teacher

    return AmberCompression.model_validate(
        {
            "apiVersion": "amber.dev/v1alpha1",
            "kind": "AmberCompression",
            "metadata": {"name": f"{arm}-s{seed}"},
            "spec": {
                "teacher": {"uri": teacher_uri},
                "data": {"cacheUri": data_uri},
                "storage": {"uri": store_uri},
                "resources": {"pods": 1, "gpusPerPod": 0},
                "deepspeed": {"zeroStage": 0, "precision": "fp32"},
                "stages": stages(arm, teacher.CONFIG["num_layers"], budget, seed),
            },
        }
    )


def write_data(folder: Path, samples: int, seed: int) -> Path:
    """Training pairs as the encode stage writes them (`data.cacheUri`)."""
    import torch
    from safetensors.torch import save_file

    from amber_trainer.quality import teacher

    train, _ = task.split()
    tokens, emb, mask, _ = teacher.dataset(train, samples, seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "latents": tokens.contiguous(),
            "text": emb.contiguous(),
            "text_mask": mask.contiguous(),
            "side": torch.tensor(task.SIDE),
        },
        str(folder / "pairs-00000.safetensors"),
    )
    return folder


def run_arm(obj: AmberCompression, committed: dict[str, Path]) -> dict[str, Path]:
    """Run one arm; the local folder of each model stage's committed output, by stage name.

    `committed` maps spec hashes to committed output folders of arms already run; matching
    stages are copied in first, so `amber run` reuses them. New ones are added to it.
    """
    runs = plan(obj)
    for run in runs:
        source = committed.get(run.spec_hash)
        target = Path(run.run_uri) / run.stage.name / OUTPUT
        if source is not None and not target.exists():
            shutil.copytree(source, target)
    run_resource(obj, here=True)
    outputs = {}
    for run in runs:
        # A shared stage keeps pointing at the arm that ran it: it is measured once.
        folder = committed.setdefault(run.spec_hash, Path(run.run_uri) / run.stage.name / OUTPUT)
        if run.stage.type in MODEL_STAGES:
            outputs[run.stage.name] = folder
    return outputs
