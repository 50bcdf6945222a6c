"""AdamW's moments across a change of world size, with real DeepSpeed engines under torchrun:
a step taken after resuming on another number of processes equals the step the
uninterrupted run took, which it does only if the moments and the step count came back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from trainer_helpers import free_port

pytestmark = pytest.mark.slow

# One engine as the stages build it (loop.make_engine, ZeRO-2 when there are several
# processes), trained on a global batch of 4 rows split across the ranks, so that any world
# size computes the same gradient.
WORKER = textwrap.dedent(
    """
    import os, sys, torch
    from pathlib import Path
    from torch import nn
    from amber.api import DeepSpeedSpec
    from amber.stages import TrainingParams
    from amber_trainer.train import loop, moments

    mode, folder = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    class Objective(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Linear(6, 9)
            self.unused = nn.Linear(3, 3)  # trainable, never a gradient: no torch state
            self.b = nn.Linear(9, 4)
            self.frozen = nn.Linear(4, 4).requires_grad_(False)
        def forward(self, x):
            return self.frozen(self.b(torch.tanh(self.a(x)))).pow(2).mean()

    params = TrainingParams(
        steps=8, learningRate=1e-2, warmupSteps=2, microBatchSize=4 // world, gradClip=0
    )
    ds = DeepSpeedSpec(zeroStage=2, precision="fp32", activationCheckpointing=False)
    objective = Objective()
    engine = loop.make_engine(objective, ds, params, 8, world, torch.device("cpu"))

    def step(i):
        rows = torch.randn(4, 6, generator=torch.Generator().manual_seed(i))
        per = 4 // world
        loss = engine(rows[rank * per : (rank + 1) * per])
        engine.backward(loss)
        engine.step()

    if mode == "save":
        for i in range(3):
            step(i)
        client = {moments.NAMES: moments.trainable_names(objective)}
        engine.save_checkpoint(str(folder / "ckpt"), tag="state", client_state=client)
    else:
        _, client = engine.load_checkpoint(
            str(folder / "ckpt"), tag="state", load_optimizer_states=False
        )
        moments.sync_learning_rate(engine)
        if mode == "resume":
            found = moments.read(folder / "ckpt" / "state", client[moments.NAMES])
            assert moments.put(engine, *found) == []
    step(3)
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in objective.named_parameters()},
                   folder / f"{mode}-{world}.pt")
    # Leave as the trainer does: a rank that exits with the process group (and DeepSpeed's
    # shared-memory communicator) still up can abort in teardown ("terminate called
    # without an active exception"), failing a run whose step was already saved.
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    """
)


def launch(tmp_path, nproc: int, mode: str) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}",
            str(script),
            mode,
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_step_after_resuming_on_another_world_size_is_the_uninterrupted_step(
    tmp_path, before, after
):
    launch(tmp_path, before, "save")  # 3 steps, a checkpoint, and the 4th step
    launch(tmp_path, after, "resume")  # the checkpoint, the moments, the 4th step
    launch(tmp_path, after, "fresh")  # the checkpoint without the moments, the 4th step
    straight = torch.load(tmp_path / f"save-{before}.pt")
    resumed = torch.load(tmp_path / f"resume-{after}.pt")
    fresh = torch.load(tmp_path / f"fresh-{after}.pt")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # Without the moments the same step lands elsewhere: the comparison above can fail.
    moved = [n for n in ("a.weight", "b.weight") if not torch.allclose(fresh[n], straight[n])]
    assert moved == ["a.weight", "b.weight"]
