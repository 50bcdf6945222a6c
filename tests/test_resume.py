"""A trainer stage killed at any moment resumes from its last committed checkpoint: the same
curve, another number of processes, inside a fuse phase. Real 2-process DeepSpeed (ZeRO-2,
gloo) runs on CPU, storage on loopback S3."""

from __future__ import annotations

import json
import time

import pytest

from amber import commits
from amber.storage import open_store
from trainer_helpers import (
    FAST,
    finish,
    kill_at_first_checkpoint,
    kill_tree,
    stage_runs,
    tiny_resource,
    torchrun,
)

pytestmark = [pytest.mark.slow, pytest.mark.s3]
ORDER = ["score", "prune", "distill", "finetune", "fuse", "eval"]


@pytest.mark.parametrize("stage", ["distill", "finetune"])
def test_killed_stage_resumes_from_its_last_checkpoint_with_the_same_curve(bucket, tmp_path, stage):
    # finetune: the preset's on-policy trajectories are part of what a checkpoint restores.
    steps = {stage: {**FAST[stage], "steps": 24, "checkpointEvery": 8}}
    for prefix in ("straight", "killed"):
        runs = stage_runs(tiny_resource(f"s3://{bucket}/{stage}-{prefix}", **steps))
        assert runs["finetune"].stage.on_policy_fraction > 0
        for name in ORDER[: ORDER.index(stage)]:
            assert finish(torchrun(runs[name], tmp_path, nproc=1))[0] == 0
    straight = stage_runs(tiny_resource(f"s3://{bucket}/{stage}-straight", **steps))[stage]
    code, out, _ = finish(torchrun(straight, tmp_path))
    assert code == 0, out[-2000:]

    killed = stage_runs(tiny_resource(f"s3://{bucket}/{stage}-killed", **steps))[stage]
    store = open_store(killed.run_uri)
    proc = torchrun(killed, tmp_path)
    first = kill_at_first_checkpoint(proc, store, stage)
    assert commits.read_manifest(store, f"{stage}/output") is None
    # A newer checkpoint whose files landed but whose marker did not: must be ignored.
    store.write_bytes(f"{stage}/{commits.checkpoint_folder(first.step + 4)}/state/junk.pt", b"x")

    code, out, events = finish(torchrun(killed, tmp_path))
    assert code == 0, out[-2000:]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and resumed[0]["step"] >= first.step and resumed[0]["step"] < 24
    done = json.loads(open_store(killed.run_uri).read_text(f"{stage}/output/metrics.json"))
    reference = json.loads(open_store(straight.run_uri).read_text(f"{stage}/output/metrics.json"))
    assert len(done["loss"]) == 24
    assert done["loss"] == pytest.approx(reference["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(("stage", "before", "after"), [("distill", 2, 1), ("finetune", 1, 2)])
def test_a_stage_resumes_with_another_number_of_processes(bucket, tmp_path, stage, before, after):
    # Killed after a checkpoint written by `before` processes, resumed by `after`: the
    # weights, step, schedule, loss history and AdamW's moments go on (tests/test_moments.py
    # checks the moments' values; this, that a stage takes that path).
    steps = {stage: {**FAST[stage], "steps": 24, "checkpointEvery": 8}}
    runs = stage_runs(tiny_resource(f"s3://{bucket}/world-{before}-{after}", **steps))
    for name in ORDER[: ORDER.index(stage)]:
        assert finish(torchrun(runs[name], tmp_path, nproc=1))[0] == 0
    store = open_store(runs[stage].run_uri)
    proc = torchrun(runs[stage], tmp_path, nproc=before)
    first = kill_at_first_checkpoint(proc, store, stage)
    logged = [json.loads(line) for line in proc.stdout.read().splitlines() if '"progress"' in line]
    assert first.metrics["world"] == before

    code, out, events = finish(torchrun(runs[stage], tmp_path, nproc=after))
    assert code == 0, out[-3000:]
    [resumed] = [e for e in events if e["event"] == "resumed"]
    assert resumed["step"] >= first.step and resumed["world"] == before
    [resharded] = [e for e in events if e["event"] == "resharded"]
    assert resharded["written"] == before and resharded["world"] == after
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert not any("afresh" in w for w in warnings), warnings
    done = json.loads(store.read_text(f"{stage}/output/metrics.json"))
    assert len(done["loss"]) == 24  # the curve is whole, not restarted from step 0
    # The history up to the checkpoint is the killed attempt's own, step for step.
    killed = {e["step"]: e["loss"] for e in logged if e["event"] == "progress"}
    for step in range(1, resumed["step"] + 1):
        assert done["loss"][step - 1] == pytest.approx(killed[step], abs=1e-6), step
    if stage == "distill":  # feature losses fall steadily; flow matching's are too noisy
        # From the trained weights: the first loss after the resume (taken before that
        # step's update) is below the untrained start's.
        assert done["loss"][resumed["step"]] < done["loss"][0]


def test_killed_fuse_resumes_inside_its_phase_with_the_whole_history(bucket, tmp_path):
    short = {"steps": 2, "checkpointEvery": 100}
    steps = {
        "distill": {**FAST["distill"], **short},
        "finetune": {**FAST["finetune"], **short},
        "fuse": {**FAST["fuse"], "steps": 40, "checkpointEvery": 4, "finetuneSteps": 6},
    }
    for prefix in ("straight", "killed"):
        runs = stage_runs(tiny_resource(f"s3://{bucket}/{prefix}", **steps))
        for name in ("score", "prune", "distill", "finetune"):
            assert finish(torchrun(runs[name], tmp_path, nproc=1))[0] == 0
    straight = stage_runs(tiny_resource(f"s3://{bucket}/straight", **steps))["fuse"]
    code, out, _ = finish(torchrun(straight, tmp_path, nproc=1))
    assert code == 0, out[-2000:]

    killed = stage_runs(tiny_resource(f"s3://{bucket}/killed", **steps))["fuse"]
    store = open_store(killed.run_uri)
    proc = torchrun(killed, tmp_path, nproc=1)
    deadline = time.monotonic() + 300
    # Killed inside the second phase: the first is committed, the second checkpointed.
    while getattr(commits.latest_checkpoint(store, "fuse"), "step", 0) <= 40:
        assert proc.poll() is None, "finished before the second phase's first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    kill_tree(proc)
    assert commits.read_manifest(store, "fuse/phases/phase-0") is not None
    assert commits.read_manifest(store, "fuse/output") is None

    code, out, events = finish(torchrun(killed, tmp_path, nproc=1))
    assert code == 0, out[-2000:]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and resumed[0]["phase"] == "phase-1"
    done = json.loads(store.read_text("fuse/output/metrics.json"))
    reference = json.loads(open_store(straight.run_uri).read_text("fuse/output/metrics.json"))
    assert len(done["loss"]) == 2 * 40 + 6 and len(done["phases"]) == 2
    assert done["loss"] == pytest.approx(reference["loss"], rel=1e-4, abs=1e-6)
    for mine, theirs in zip(done["phases"], reference["phases"], strict=True):
        assert mine["singleLayers"] == theirs["singleLayers"]
        for key in ("firstLoss", "finalLoss"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6)


def test_fuse_killed_at_each_phase_boundary_ends_bit_identical(bucket, tmp_path):
    """Killed once a phase has committed and before the next part's first checkpoint (as a
    power loss or a full disk there would), fuse starts the next part from the committed
    phase, its history and its optimizer's moments: the same model to the bit and the same
    history as a run never stopped. One process (ZeRO 0: a plain AdamW whose moments the
    parts share)."""
    import torch
    from safetensors.torch import load_file

    fuse = {**FAST["fuse"], "steps": 4, "checkpointEvery": 100, "finetuneSteps": 4}
    steps = {"distill": {**FAST["distill"], "steps": 2}, "fuse": fuse}
    runs = stage_runs(tiny_resource(f"s3://{bucket}/straight", **steps))
    for name in ("score", "prune", "distill", "finetune"):
        assert finish(torchrun(runs[name], tmp_path, nproc=1))[0] == 0
    straight = open_store(runs["fuse"].run_uri)
    code, out, _ = finish(torchrun(runs["fuse"], tmp_path, nproc=1))
    assert code == 0, out[-2000:]
    reference = json.loads(straight.read_text("fuse/output/metrics.json"))
    phases = len(reference["phases"])
    assert phases >= 2

    def tensors(store) -> dict:
        store.download("fuse/output/model/diffusion_pytorch_model.safetensors", tmp_path / "m")
        return load_file(tmp_path / "m")

    expected = tensors(straight)
    for boundary in range(phases):  # after phase `boundary`: the next phase, or the fine-tune
        killed = stage_runs(tiny_resource(f"s3://{bucket}/killed-{boundary}", **steps))["fuse"]
        store = open_store(killed.run_uri)
        for key in straight.list():
            if key.split("/")[0] in ("score", "prune", "distill", "finetune"):
                store.copy_from(straight, key, key)
        proc = torchrun(killed, tmp_path, nproc=1)
        deadline = time.monotonic() + 300
        while commits.read_manifest(store, f"fuse/phases/phase-{boundary}") is None:
            assert proc.poll() is None, "finished before the phase committed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        kill_tree(proc)
        assert commits.read_manifest(store, "fuse/output") is None
        assert commits.latest_checkpoint(store, "fuse") is None  # a boundary, not a checkpoint

        code, out, events = finish(torchrun(killed, tmp_path, nproc=1))
        assert code == 0, out[-2000:]
        (resumed,) = [e for e in events if e["event"] == "resumed"]
        assert resumed["checkpoint"].endswith(f"fuse/phases/phase-{boundary}")
        assert resumed["phase"] == (
            f"phase-{boundary + 1}" if boundary + 1 < phases else "finetune"
        )
        done = json.loads(store.read_text("fuse/output/metrics.json"))
        assert done["loss"] == reference["loss"] and done["phases"] == reference["phases"]
        got = tensors(store)
        assert got.keys() == expected.keys()
        different = [k for k in expected if not torch.equal(got[k], expected[k])]
        assert not different, (boundary, different[:5])
