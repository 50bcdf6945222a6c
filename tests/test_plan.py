"""The memory planner and `amber plan`: arithmetic, agreement with the peaks measured on an
H200 (bench/results), and the GPU benchmark's every row on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from amber.api import DeepSpeedSpec, StorageSpec, TeacherSpec
from amber.cli import app, parse_bytes
from amber.plan import StageRun
from amber.stages import DistillStage, FinetuneStage
from amber_trainer import data
from amber_trainer.costs import memory
from amber_trainer.model import models
from amber_trainer.model.forward import embed, run_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "bench" / "results").glob("*gpu-step*.json"))  # bench/gpu_step.py
EXAMPLE_6B = ROOT / "manifests" / "examples" / "amber-6b.yaml"


def test_state_bytes_follow_the_zero_stage():
    assert sum(memory.state_bytes(1000, 0, 1)) == 20 * 1000
    weights, grads, optim = memory.state_bytes(800, 2, 8)
    assert (weights, grads, optim) == (1600, 2 * 100 + 4 * 100, 12 * 100)
    assert memory.state_bytes(800, 3, 8)[0] == 200


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("141GB") == 141e9
    assert parse_bytes("1024") == 1024


def _run(stage, cfg, checkpointing):
    return StageRun(
        namespace="t",
        name="t",
        index=0,
        stage=stage,
        teacher=TeacherSpec(config=cfg),
        data={"synthetic": {}},
        storage=StorageSpec(uri="/tmp/unused"),
        deepspeed=DeepSpeedSpec(activation_checkpointing=checkpointing),
        resources={"gpusPerPod": 1},
    )


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_planner_predicts_the_measured_gpu_peaks_within_15_percent(path):
    result = json.loads(path.read_text())
    args = result["args"]
    layers, batch = int(args["layers"]), int(args["batch"])
    cfg = models.named_config("qwen-image", num_layers=2 * layers)
    text = int(args["text_tokens"])
    shape = memory.Shape(batch, result["tokens"] - text, text)
    checked = 0
    for row in result["rows"]:
        name = row["row"]
        # other optimizer wrappers than the trainer's, tried for comparison: not planned
        if not name.startswith("trainer") or "error" in row or "bf16opt" in name:
            continue
        if "dsfused" in name:
            continue
        stage = DistillStage(name="d") if "distill" in name else FinetuneStage(name="f")
        run = _run(stage, cfg, "+ckpt" in name)
        mode = "eager" if "eager" in name else "compiled"
        student = {**cfg, "num_layers": layers}
        predicted = memory.predict(run, cfg, student, shape, 1, mode).total / 2**30
        assert predicted == pytest.approx(row["peak_gib"], rel=0.15), name
        checked += 1
    assert checked >= 1


def test_activation_constant_tracks_diffusers_block():
    """bytes kept per token per hidden unit: the GPU-measured constant against the tensors the
    real block saves for backward on the CPU (fp32 elements; bf16 on the GPU adds fp32 norm
    upcasts). A diffusers change to the block moves the count and fails this test."""
    cfg = models.named_config(
        "tiny", num_layers=1, num_attention_heads=4, attention_head_dim=64,
        joint_attention_dim=64, axes_dims_rope=(16, 24, 24),
    )  # fmt: skip
    model = models.build(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch = data.synthetic(cfg, 1, latent_size=64, text_tokens=32, batch_size=1)[0]
    x = batch.noised(torch.rand(1), torch.randn(batch.latents.shape))
    img, txt, cond = embed(model, x)
    img, txt = img.detach().requires_grad_(), txt.detach().requires_grad_()
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_block(model.transformer_blocks[0], img, txt, cond)
    width, tokens = 4 * 64, img.shape[1] + txt.shape[1]
    elements = sum(saved.values()) / 4 / (tokens * width)
    assert 20 < elements < 30
    assert 1.0 <= memory.ACTIVATION_BYTES["eager"] / 2 / elements <= 1.5


def test_plan_command_reports_and_refuses():
    runner = CliRunner()
    ok = runner.invoke(app, ["plan", str(EXAMPLE_6B), "-o", "json"])
    assert ok.exit_code == 0, ok.output
    rows = {r["stage"]: r for r in json.loads(ok.stdout)}
    assert rows["finetune"]["fits"] and rows["finetune"]["gpus"] == 32
    assert rows["finetune"]["memoryGiB"]["teacher"] == pytest.approx(38.0, abs=0.5)  # 20.4B bf16
    assert rows["score"]["memoryGiB"] is None and rows["finetune"]["gpuHours"] > 0
    small = runner.invoke(app, ["plan", str(EXAMPLE_6B), "--gpus-per-pod", "1",
                                "--gpu-memory", "40GiB"])  # fmt: skip
    assert small.exit_code == 1
    assert "will not fit finetune" in small.output
    bad = runner.invoke(app, ["plan", str(EXAMPLE_6B), "--gpu-memory", "lots"])
    assert bad.exit_code == 2 and "--gpu-memory" in bad.output


@pytest.mark.slow
def test_gpu_benchmark_runs_every_row_on_the_cpu(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--tiny", "--steps", "2",
           "--warmup", "1", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 12 and all("error" not in r and r["ms_per_step"] > 0 for r in rows)
