"""Building tiny resources and launching trainer stages as real torchrun process groups."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from amber import commits, presets
from amber.local import free_port
from amber.plan import StageRun, on_this_machine, plan, torchrun_args
from amber.resource import parse

ROOT = Path(__file__).parent.parent
TINY_YAML = ROOT / "manifests" / "examples" / "amber-random.yaml"

# Small enough for two CPU cores, large enough for the losses to move visibly.
FAST = {
    "score": {"calibrationSamples": 8, "timesteps": [0.2, 0.8]},
    "distill": {"steps": 30, "learningRate": 2e-3, "microBatchSize": 8, "checkpointEvery": 10},
    "finetune": {"steps": 40, "learningRate": 2e-3, "microBatchSize": 8, "checkpointEvery": 20},
    "fuse": {
        "steps": 6,
        "blocksPerPhase": 3,
        "finetuneSteps": 6,
        "learningRate": 1e-3,
        "microBatchSize": 4,
        "checkpointEvery": 4,
    },
    "eval": {"samples": 8, "timestepBuckets": 3},
}


def tiny_resource(store: str, name: str = "tiny", **overrides) -> dict:
    """The tiny example at FAST's sizes (`overrides`: stage name -> its fields instead), its
    preset written out as `spec.stages` with the presets' warm start before finetune, so
    that the tests go through every stage type the pipeline can have."""
    doc = yaml.safe_load(TINY_YAML.read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["storage"] = {"uri": store}
    assert doc["spec"].pop("preset") == "amber-6b"
    del doc["spec"]["overrides"]
    fields = copy.deepcopy({**FAST, **overrides})
    stages = []
    for stage in presets.amber_6b(doc["spec"]["teacher"]["config"]["num_layers"]):
        if stage["type"] == "finetune":
            stages.append({**presets.warm_start(), **fields["distill"]})
        stages.append({**stage, **fields.get(stage["type"], {})})
    doc["spec"]["stages"] = stages
    return doc


def stage_of(doc: dict, name: str) -> dict:
    """The stage called `name` in a resource's `spec.stages`, to change in place."""
    return next(s for s in doc["spec"]["stages"] if s.get("name", s["type"]) == name)


def stage_runs(doc: dict) -> dict[str, StageRun]:
    return {r.stage.name: r for r in plan(parse(doc))}


def _quietly(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def moto_server(
    host: str = "127.0.0.1", start=_quietly, timeout: float = 30
) -> tuple[subprocess.Popen, str]:
    """moto in server mode, in its own process (the tests' S3, and the benchmarks'): the
    process and its URL, once it answers. `start` starts the command (the real node's
    tests run it inside the node's network namespace)."""
    port = free_port()
    proc = start([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)])
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)


def trainer_env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(run: StageRun | dict, tmp: Path, stage_type: str | None = None, nproc: int = 2):
    """Start `amber trainer` for one stage under torchrun, as a pod would; returns the Popen."""
    config = tmp / f"{stage_type or run.stage.name}-{time.monotonic_ns()}.json"
    if isinstance(run, StageRun):
        config.write_text(run.model_dump_json(by_alias=True))
        stage_type = run.stage.type
    else:
        config.write_text(json.dumps(run))
    args = torchrun_args(stage_type, str(config), nproc, on_this_machine(free_port()))
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=trainer_env(),
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, list[dict]]:
    out, _ = proc.communicate(timeout=timeout)
    events = [json.loads(line) for line in out.splitlines() if line.startswith('{"event"')]
    return proc.returncode, out, events


def kill_at_first_checkpoint(proc: subprocess.Popen, store, stage: str, timeout: float = 300):
    """Wait for `stage`'s first committed checkpoint, then kill the gang as a power loss
    would; that checkpoint's manifest."""
    deadline = time.monotonic() + timeout
    while commits.latest_checkpoint(store, stage) is None:
        if proc.poll() is not None:
            said = "".join(part or "" for part in proc.communicate())
            raise AssertionError(f"finished before its first checkpoint: {said[-3000:]}")
        assert time.monotonic() < deadline, f"no checkpoint of {stage} in {timeout} s"
        time.sleep(0.2)
    kill_tree(proc)
    return commits.latest_checkpoint(store, stage)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (torchrun puts workers in their own
    sessions, so a process-group kill would leave them running)."""
    import psutil

    parent = psutil.Process(proc.pid)
    descendants = parent.children(recursive=True)
    for victim in [parent, *descendants]:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    # Only Popen may reap its own child: were psutil to reap it first, Popen (in this or a
    # waiting thread) would find no child and report exit status 0 for a killed process.
    proc.wait(timeout=60)
    psutil.wait_procs(descendants, timeout=60)
