"""What every stage process shares: its place in the gang, storage, DeepSpeed, reporting.

A stage runs under `torchrun` (1..N nodes x 1..G processes). The same code path serves GPUs
(nccl, bf16) and CPUs (`DS_ACCELERATOR=cpu`, gloo, fp32): only `Runtime.device` differs.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from amber import commits, lease, state
from amber.api import DeepSpeedSpec
from amber.plan import OUTPUT, StageRun
from amber.records import Event, ProgressRecord, StageResult
from amber.stages import TrainingParams
from amber.storage import Store, open_store
from amber_trainer.train import speed

# Kubernetes mounts this file into every container; a test pod runner names another.
TERMINATION_LOG_ENV = "AMBER_TERMINATION_LOG"
PROGRESS_EVERY_S = 10.0


@dataclass
class Runtime:
    run: StageRun
    rank: int
    world: int
    local_rank: int
    device: torch.device
    store: Store  # rooted at {storage}/{namespace}/{name}
    workdir: Path  # this process's scratch space
    # The run lease's holder this process works for (`amber run`'s; None under the
    # operator): every commit marker is written only while it holds the folder.
    fence: lease.Fence | None = None
    _last_progress: float = field(default=0.0, repr=False)

    @property
    def stage(self) -> str:
        return self.run.stage.name

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def log(self, event: str, **fields: Any) -> None:
        """One event line on stdout (rank 0): `amber run` draws its progress bars from these."""
        if self.is_main:
            print(Event(event=event, stage=self.stage, **fields).line(), flush=True)

    def progress(
        self,
        step: int,
        total: int,
        steps_per_second: float | None = None,
        samples_per_second: float | None = None,
        **metrics: Any,
    ) -> None:
        """One step done: an event line, and at a bounded rate the stage's progress record
        in storage (the operator's progress, rates and time left). Rates are since the
        attempt's (or the fusion phase's) first step."""
        rates = {"steps_per_second": steps_per_second, "samples_per_second": samples_per_second}
        shown = {k: round(v, 3) for k, v in rates.items() if v is not None}
        self.log("progress", step=step, total=total, **shown, **metrics)
        now = time.monotonic()
        if self.is_main and (now - self._last_progress > PROGRESS_EVERY_S or step == total):
            self._last_progress = now
            record = ProgressRecord(
                step=step,
                total=total,
                time=time.time(),
                spec_hash=self.run.spec_hash,
                **rates,
                **metrics,
            )
            text = record.model_dump_json(by_alias=True, exclude_none=True)
            self.store.write_text(state.progress_key(self.stage), text)

    def output(self) -> commits.Manifest | None:
        """This stage's committed output for the current spec, if it exists; otherwise what
        another spec left in the stage's folder is removed first (`amber.state`)."""
        manifest = None
        if self.is_main:  # a damaged one is quarantined: the stage runs again
            found = state.read(self.store, self.run, self.warn, detail=False)
            if found.committed:
                manifest = found.output
            else:
                state.clear_stale(self.store, self.run, self.warn)
        return self.broadcast(manifest)

    def warn(self, message: str) -> None:
        self.log("warning", message=message)

    def fetch_output(self, stage: str) -> Path:
        """Download another stage's committed output (each process gets its own copy). A
        damaged one is quarantined, so the next run re-runs `stage` instead of failing here
        again."""
        folder = f"{stage}/{OUTPUT}"
        # Sizes here; the download below checks every checksum.
        manifest = commits.read_output(self.store, folder, self.warn, checksums=False)
        if manifest is None:
            raise FileNotFoundError(f"stage {stage!r} has no committed output in {self.store}")
        try:
            return commits.fetch(self.store, manifest, self.workdir / "inputs" / stage)
        except commits.CorruptCommit as err:
            if commits.read_manifest(self.store, folder) is not None:  # first rank to see it
                commits.quarantine(self.store, folder, err.reason)
            raise commits.CorruptCommit(
                folder, f"{err.reason}; quarantined: run again to re-run stage {stage}"
            ) from None

    def commit_output(
        self, local_dir: Path, step: int, metrics: dict, uploaded: dict | None = None
    ) -> commits.Manifest:
        """Rank 0 uploads the output, marker last, listing the files every rank `uploaded`
        into the output folder itself; every rank waits for it."""
        parts = self.gather(uploaded or {})
        manifest = None
        if self.is_main:
            folder = f"{self.stage}/{OUTPUT}"
            files = commits.upload_files(self.store, folder, local_dir)
            for part in parts:
                files.update(part)
            manifest = commits.write_marker(
                self.store, folder, step, files, metrics, self.run.spec_hash, self.fence
            )
        self.barrier()
        return manifest


def setup(run: StageRun) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # Under torchrun (even with one process) join the gang; DeepSpeed needs a process group.
    if "MASTER_ADDR" in os.environ and not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    storage = run.storage
    store = open_store(run.run_uri, endpoint=storage.endpoint, region=storage.region)
    workdir = Path(tempfile.mkdtemp(prefix=f"amber-{run.stage.name}-r{rank}-"))
    return Runtime(run, rank, world, local_rank, device, store, workdir, lease.fence_from_env())


def teardown(rt: Runtime) -> None:
    shutil.rmtree(rt.workdir, ignore_errors=True)
    if rt.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def deepspeed_config(
    ds: DeepSpeedSpec, params: TrainingParams, total_steps: int, world: int, on_gpu: bool
) -> dict[str, Any]:
    """The DeepSpeed config for a training stage, from the resource's `deepspeed` settings."""
    # CPUs train in fp32: bf16 matmuls there are slow and not what the GPUs will compute.
    precision = ds.precision if on_gpu else "fp32"
    stage = ds.zero_stage_for(world)
    zero: dict[str, Any] = {"stage": stage}
    if ds.offload == "cpu" and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": params.micro_batch_size,
        "gradient_accumulation_steps": params.gradient_accumulation,
        "gradient_clipping": params.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": params.learning_rate,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": params.weight_decay,
                **speed.optimizer_params(on_gpu),
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": max(total_steps, params.warmup_steps + 1),
                "warmup_min_lr": 0.0,
                "warmup_max_lr": params.learning_rate,
                "warmup_num_steps": max(1, params.warmup_steps),  # DeepSpeed rejects 0
                "warmup_type": "linear",
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(rt: Runtime | None, result: StageResult) -> None:
    """The stage's result: its last event line, and the termination message Kubernetes reads
    into the pod's status."""
    if rt is not None and not rt.is_main:
        return
    print(result.event().line(), flush=True)
    path = Path(os.environ.get(TERMINATION_LOG_ENV, "/dev/termination-log"))
    if TERMINATION_LOG_ENV in os.environ or path.exists():
        path.write_text(result.termination_message())
    sys.stdout.flush()
