"""Which state a stage is in, the one answer `amber run`, the operator and the trainer share
(`amber.state`), and the one policy for what another spec left: on a real local store."""

from __future__ import annotations

import hashlib
import time

from amber import commits, state
from amber.plan import OUTPUT
from amber.records import ProgressRecord
from amber.storage import open_store
from trainer_helpers import stage_runs, tiny_resource


def checkpoint(store, stage: str, step: int, spec_hash: str) -> None:
    folder = f"{stage}/{commits.CHECKPOINTS}/step-{step:010d}"
    store.write_text(f"{folder}/state.bin", "x")
    entry = commits.FileEntry(size=1, sha256=hashlib.sha256(b"x").hexdigest())
    commits.write_marker(store, folder, step, {"state.bin": entry}, {}, spec_hash)


def progress(store, stage: str, step: int, spec_hash: str) -> None:
    record = ProgressRecord(step=step, total=10, time=time.time(), spec_hash=spec_hash)
    store.write_text(state.progress_key(stage), record.model_dump_json(by_alias=True))


def test_a_stage_is_absent_stale_in_progress_or_committed(tmp_path):
    store = open_store(str(tmp_path))
    run = stage_runs(tiny_resource(str(tmp_path)))["distill"]
    assert state.read(store, run).kind == "absent"

    # Another spec's output, progress and checkpoints say nothing about this spec's run.
    commits.write_marker(store, f"distill/{OUTPUT}", 30, {}, {}, "another")
    progress(store, "distill", 7, "another")
    checkpoint(store, "distill", 20, "another")
    found = state.read(store, run)
    assert (found.kind, found.output.spec_hash, found.checkpoint, found.progress) == (
        "stale",
        "another",
        None,
        None,
    )

    checkpoint(store, "distill", 10, run.spec_hash)
    found = state.read(store, run)
    assert (found.kind, found.checkpoint, found.progress) == ("in progress", 10, None)
    progress(store, "distill", 12, run.spec_hash)
    assert state.read(store, run).progress.step == 12
    assert state.read(store, run, detail=False).kind == "stale"  # not read in detail

    commits.write_marker(store, f"distill/{OUTPUT}", 30, {}, {}, run.spec_hash)
    assert state.read(store, run).committed


def test_what_another_spec_left_is_removed_before_the_stage_runs_again(tmp_path):
    store = open_store(str(tmp_path))
    run = stage_runs(tiny_resource(str(tmp_path)))["distill"]
    commits.write_marker(store, f"distill/{OUTPUT}", 30, {}, {}, "another")
    for step in (10, 20, 30):
        checkpoint(store, "distill", step, "another")
    checkpoint(store, "distill", 5, run.spec_hash)
    store.write_text("distill/checkpoints/step-0000000040/partial.bin", "x")  # no marker yet

    removed = state.clear_stale(store, run, log=lambda message: None)
    assert sorted(removed) == [
        "distill/checkpoints/step-0000000010",
        "distill/checkpoints/step-0000000020",
        "distill/checkpoints/step-0000000030",
        f"distill/{OUTPUT}",
    ]
    # Retention keeps the newest steps: the old spec's 30 would have pushed out this 5.
    commits.prune_checkpoints(store, "distill", keep=1)
    assert commits.latest_checkpoint(store, "distill", run.spec_hash).step == 5
    assert store.exists("distill/checkpoints/step-0000000040/partial.bin")
    assert state.read(store, run).kind == "in progress"
