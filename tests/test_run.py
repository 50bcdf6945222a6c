"""`amber run`: the whole pipeline on one machine, interrupted and continued."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from amber import commits, history, layout, lease, local
from amber.records import ProgressRecord
from amber.storage import open_store
from trainer_helpers import (
    ROOT,
    kill_at_first_checkpoint,
    stage_of,
    tiny_resource,
    trainer_env,
)

pytestmark = pytest.mark.slow


def amber_run(resource, *args, **popen):
    return subprocess.Popen(
        [sys.executable, "-m", "amber", "run", str(resource), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=trainer_env(),
        start_new_session=True,
        **popen,
    )


def write(tmp_path, doc, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def check_final_model(final) -> None:
    """The final model is a diffusers folder, with its card, that a fresh process loads."""
    assert (final / "README.md").read_text().startswith("---\nlibrary_name: diffusers")
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from amber_trainer.model import hybrid; "
            "m = hybrid.AmberHybridTransformer2DModel.from_pretrained(sys.argv[1]); "
            "print(m.config.num_layers, m.config.num_single_layers)",
            str(final),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.stdout.split() == ["6", "5"], check.stderr[-2000:]


def stamps(run_folder) -> dict:
    """Size and time of every file in the run's folder but its own records (the history
    and the lease)."""
    kept = {history.KEY, lease.KEY}
    return {
        p: (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(run_folder.rglob("*"))
        if p.is_file() and p.name not in kept
    }


def test_interrupted_run_continues_where_it_stopped(tmp_path):
    store_dir = tmp_path / "store"
    resource = write(tmp_path, tiny_resource(str(store_dir)))
    run_store = open_store(str(store_dir / "default" / "tiny"))

    proc = amber_run(resource, "--nproc", "2", "-o", "json")
    # As if the machine lost power mid-stage.
    checkpoint = kill_at_first_checkpoint(proc, run_store, "distill", timeout=400)

    proc = amber_run(resource, "--nproc", "2", "-o", "json")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out)
    status = {s["stage"]: s["status"] for s in report["stages"]}
    assert status == {
        "score": "reused",
        "prune": "reused",
        "distill": "resumed",
        "finetune": "ran",
        "fuse": "ran",
        "eval": "ran",
    }
    distill = next(s for s in report["stages"] if s["stage"] == "distill")
    assert distill["resumed_from"] >= checkpoint.step
    # The run's own records: every stage ran once (distill never finished before the kill,
    # then resumed once), and the second invocation reused what the first committed.
    records = history.entries(run_store)
    ran = [r["stage"] for r in records if r["status"] == "ran"]
    assert ran == ["score", "prune", "finetune", "fuse", "eval"]
    assert [r["stage"] for r in records if r["status"] == "reused"] == ["score", "prune"]
    assert [r["stage"] for r in records if r["status"] == "resumed"] == ["distill"]
    # The report page says the same: every stage committed, distill resumed in attempt 2.
    page = (store_dir / "default" / "tiny" / "report.html").read_text()
    # The run's folder holds its stages' folders and its own entries, which no stage may be
    # named as (the validator refuses them: amber/layout.py).
    entries = {p.name for p in (store_dir / "default" / "tiny").iterdir()}
    assert entries - set(status) - {f".{lease.KEY}.lock"} <= set(layout.ENTRIES), entries
    assert report["report"] == str(store_dir / "default" / "tiny" / "report.html")
    assert page.count('class="committed">committed') == 6
    assert f"<td>{distill['resumed_from']}</td>" in page

    final = store_dir / "default" / "tiny" / "final"
    assert report["final"] == str(final)
    check_final_model(final)

    # Run again unchanged: every stage reused and not a byte rewritten in the run's folder
    # but its own records (the history and the lease).
    run_folder = store_dir / "default" / "tiny"
    before = stamps(run_folder)
    proc = amber_run(resource, "--nproc", "1", "-o", "json")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert {s["status"] for s in json.loads(out)["stages"]} == {"reused"}
    assert stamps(run_folder) == before

    # A changed stage re-runs with everything after it, nothing before it.
    changed = tiny_resource(str(store_dir))
    stage_of(changed, "finetune")["steps"] = 30
    proc = amber_run(write(tmp_path, changed), "--nproc", "1", "-o", "json")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    status = {s["stage"]: s["status"] for s in json.loads(out)["stages"]}
    assert status == {
        "score": "reused",
        "prune": "reused",
        "distill": "reused",
        "finetune": "ran",
        "fuse": "ran",
        "eval": "ran",
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("spec: [unclosed", "not valid YAML"),
        (None, "spec.stages[4].singleLayers: 9 exceeds the student's 6 layers"),
        ("kind: Pod\napiVersion: v1\n", "expected one AmberCompression, found 0"),
    ],
)
def test_invalid_resource_exits_2_and_touches_no_storage(tmp_path, content, message):
    store_dir = tmp_path / "store"
    if content is None:
        doc = tiny_resource(str(store_dir))
        stage_of(doc, "fuse")["singleLayers"] = 9
        content = yaml.safe_dump(doc)
    resource = tmp_path / "bad.yaml"
    resource.write_text(content)
    proc = amber_run(resource, "--store", str(store_dir))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert message in err
    assert not store_dir.exists()


def test_readme_example_is_the_embedded_default():
    readme = (ROOT / "README.md").read_text()
    assert "amber run manifests/examples/amber-tiny.yaml" in readme
    assert "./tests/run" in readme
    assert "./tests/run" in (ROOT / ".ci" / "run").read_text()


def test_every_launcher_commits_what_torchrun_commits(tmp_path, monkeypatch):
    # `amber run` runs a one-process stage in its warm worker, the quality benchmark dozens
    # of tiny stages in its own process: the same pipeline as torchrun's, to the weights.
    import tempfile

    from safetensors.torch import load_file

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)
    stages = ["score", "prune", "distill"]
    weights = {}
    for launcher in ("torchrun", "auto", "here"):
        store = tmp_path / f"store-{launcher}"
        obj = local.AmberCompression.model_validate(tiny_resource(str(store)))
        outcomes, _ = local.run_resource(obj, only=stages, processes=1, launcher=launcher)
        assert [o.status for o in outcomes if o.stage in stages] == ["ran"] * 3
        folder = store / "default" / "tiny" / "distill" / "output" / "model"
        weights[launcher] = load_file(str(next(folder.glob("*.safetensors"))))
        # A run that succeeded leaves no log folder, no stage work folder behind (torch's
        # compile cache is meant to stay).
        left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]
        assert left == [], launcher
    for launcher in ("auto", "here"):
        assert weights[launcher].keys() == weights["torchrun"].keys()
        for name, tensor in weights["torchrun"].items():
            assert torch.allclose(weights[launcher][name], tensor, atol=1e-5), (launcher, name)
    assert "MASTER_ADDR" not in os.environ  # the in-process gang's settings do not leak


def test_ctrl_c_stops_the_warm_worker_and_the_next_run_resumes(tmp_path):
    import signal

    from test_hostile import _stage_processes

    store_dir = tmp_path / "store"
    doc = tiny_resource(str(store_dir), name="ctrl-c")
    stage_of(doc, "distill").update(steps=60, checkpointEvery=5)
    resource = write(tmp_path, doc)
    run_store = open_store(str(store_dir / "default" / "ctrl-c"))
    args = ["--stages", "score,prune,distill", "-o", "json"]

    # As from a terminal: a shell that starts the tests in the background (CI) hands its
    # children SIGINT ignored, and Python then never turns it into KeyboardInterrupt.
    def terminal():
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = amber_run(resource, *args, preexec_fn=terminal)
    deadline = time.monotonic() + 400
    while commits.latest_checkpoint(run_store, "distill") is None:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    workers = _stage_processes("amber-run-ctrl-c-")
    assert workers, "the stages run in a worker whose command line names the run's logs"
    proc.send_signal(signal.SIGINT)  # what a terminal sends amber run's process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert not _stage_processes("amber-run-ctrl-c-"), "the worker outlived amber run"
    checkpoint = commits.latest_checkpoint(run_store, "distill")

    proc = amber_run(resource, *args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    stages = {s["stage"]: s for s in json.loads(out)["stages"]}
    assert [stages[s]["status"] for s in ("score", "prune")] == ["reused", "reused"]
    assert stages["distill"]["status"] == "resumed"
    assert stages["distill"]["resumed_from"] >= checkpoint.step
    # Its last progress record: the operator's rate and time left come from these.
    record = ProgressRecord.model_validate_json(run_store.read_text("distill/progress.json"))
    assert record.step == record.total == 60 and record.steps_per_second > 0
    distill = stage_of(doc, "distill")
    batch = distill["microBatchSize"] * distill.get("gradientAccumulation", 1)
    assert record.samples_per_second == pytest.approx(record.steps_per_second * batch)
