"""What a stage runner leaves: its model (diffusers format, with the hybrid class's code
when it has one), the layer map, the loss curve and the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from amber_trainer.model import hybrid, models
from amber_trainer.runtime import Runtime
from amber_trainer.train import loop

MODEL_DIR = "model"
LAYER_MAP = "layer_map.json"


def trained_model(engine, state: dict | None = None) -> torch.nn.Module:
    """The engine's student as a plain model, with the loop `state`'s moving average of its
    weights when it keeps one. Under ZeRO-3 each rank holds only a shard of every large
    weight, so they are gathered (collectively: every rank must call this) into a fresh
    copy; otherwise the student itself is returned."""
    student = engine.module.student
    if state is not None and "ema" in state:
        return loop.load_ema(student, state["ema"])
    if not engine.zero_optimization_partition_weights():
        return student
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
        state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    config = {k: v for k, v in student.config.items() if not k.startswith("_")}
    copy = models.build_empty(config)
    copy.load_state_dict(state, assign=True, strict=True)
    return copy


def save_model(model: torch.nn.Module, out: Path, layer_map: list[dict] | None) -> None:
    model.save_pretrained(out / MODEL_DIR, safe_serialization=True)
    if isinstance(model, hybrid.AmberHybridTransformer2DModel):
        hybrid.bundle_code(out / MODEL_DIR)
    if layer_map is not None:
        (out / LAYER_MAP).write_text(json.dumps(layer_map, indent=2))


def training_metrics(state: dict) -> dict:
    """What every optimising stage reports from its loop state."""
    return {
        "loss": state["losses"],
        "firstLoss": state["losses"][0],
        "finalLoss": state["losses"][-1],
        "samplesPerSecond": state["samples_per_s"],
        "peakMemoryMB": state["peak_memory_mb"],
    }


def write_output(
    rt: Runtime, model, layer_map: list[dict] | None, metrics: dict, title: str
) -> Path:
    """A model stage's output folder: model, layer map, loss curve, metrics (rank 0 writes)."""
    out = rt.workdir / "output"
    out.mkdir()
    if rt.is_main:
        save_model(model, out, layer_map)
        if metrics.get("loss"):
            loss_curve(metrics["loss"], out / "loss.png", f"{rt.stage}: {title}")
        (out / "metrics.json").write_text(json.dumps(metrics))
    return out


def loss_curve(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
