"""Recovery training's pieces: the moving average the stages save, the per-token feature
loss, and fusion's loss weights, on a real DeepSpeed engine in this process (a gang of one)."""

from __future__ import annotations

import pytest
import torch

from amber_trainer import data, runtime
from amber_trainer.model import models
from amber_trainer.stages import fuse as fuse_stage
from amber_trainer.stages import outputs
from amber_trainer.surgery import fuse
from amber_trainer.train import loop
from amber_trainer.train.objectives import FlowMatching, per_token_mse
from trainer_helpers import free_port, stage_runs, tiny_resource

TINY = models.named_config("tiny")


@pytest.fixture
def gang(monkeypatch):
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "DS_ACCELERATOR": "cpu",
    }.items():
        monkeypatch.setenv(key, value)


def test_the_saved_model_is_the_moving_average_of_the_weights(gang, tmp_path):
    steps, decay = 6, 0.8
    doc = tiny_resource(
        str(tmp_path / "store"),
        finetune={"steps": steps, "learningRate": 1e-2, "microBatchSize": 4, "ema": decay},
    )
    run = stage_runs(doc)["finetune"]
    rt = runtime.setup(run)
    student = models.build(TINY, seed=1).train()
    objective = FlowMatching(student)
    engine = loop.build_engine(rt, objective, run.stage, steps)
    rows = data.synthetic_dataset(TINY, 16, 8, 8, seed=2)
    gen = torch.Generator().manual_seed(0)
    seen = []  # the weights before each step: the initial ones, then after each step

    def make_inputs(micro_step):
        seen.append({n: p.detach().clone() for n, p in student.named_parameters()})
        batch = rows.rows(list(range(4 * (micro_step % 4), 4 * (micro_step % 4) + 4)))
        x, target = data.noised(batch, torch.rand(4, generator=gen), gen)
        return x, target, None

    state = loop.train(rt, engine, run.stage, make_inputs, loop.Part(steps))
    after = [*seen[1:], {n: p.detach().clone() for n, p in student.named_parameters()}]
    expected = {n: v.clone() for n, v in seen[0].items()}
    for n_done, weights in enumerate(after, start=1):
        d = loop.ema_decay(decay, n_done)
        for name, value in weights.items():
            expected[name] = d * expected[name] + (1 - d) * value
    for name, value in expected.items():
        torch.testing.assert_close(state["ema"][name], value, rtol=1e-5, atol=1e-7)
    last = after[-1]
    saved = outputs.trained_model(engine, state)
    name = "transformer_blocks.0.img_mlp.net.2.weight"
    torch.testing.assert_close(dict(saved.named_parameters())[name], expected[name])
    assert not torch.allclose(expected[name], last[name])  # the average is not the last step
    assert loop.ema_decay(0.999, 1) == pytest.approx(2 / 11)  # warmed up: early steps fade


def test_per_token_loss_weighs_tokens_alike_and_masks_outliers():
    target = torch.ones(1, 4, 8)
    target[0, 0] *= 100  # one token with a huge activation
    pred = target * 1.1
    # Every token is 10% off: per-token, each contributes the same 0.01.
    assert per_token_mse(pred, target).item() == pytest.approx(0.01)
    # One token far off while the others are exact: masked beyond 1 sigma, kept without.
    pred = target.clone()
    pred[0, 3] *= 5
    assert per_token_mse(pred, target).item() > 1
    assert per_token_mse(pred, target, outlier_sigma=1.0).item() == pytest.approx(0.0)


def test_fusion_weighs_text_loss_down_in_single_blocks_and_drops_it_on_the_last():
    hybrid = fuse.convert(models.build(TINY, seed=0), 4)
    weights = fuse_stage.text_weights(hybrid, 0.1)
    assert weights == [1.0] * 8 + [0.1] * 3 + [0.0]
