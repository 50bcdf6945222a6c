"""Training checkpoints in the store: DeepSpeed state plus the loop's own, marker last.

Every process saves its own DeepSpeed files (ZeRO shards its optimizer state per rank) to
local scratch and uploads them; rank 0 gathers their sizes and checksums and writes the
commit marker only after all of them are in the store. Data position and noise are pure
functions of the step (see `data.Sampler`), so the step number is all the loop needs to
continue exactly where it stopped.
"""

from __future__ import annotations

import shutil
from typing import Any

from amber import commits
from amber_trainer.runtime import Runtime

TAG = "state"
KEEP = 2  # committed checkpoints kept per stage: the newest, and one in case it is bad


def save(rt: Runtime, engine, step: int, state: dict[str, Any], metrics: dict) -> None:
    """Collective: every rank calls it at the same step."""
    local = rt.workdir / "checkpoint"
    shutil.rmtree(local, ignore_errors=True)
    engine.save_checkpoint(str(local), tag=TAG, client_state={"amber": state})
    folder = f"{rt.stage}/{commits.checkpoint_folder(step)}"
    mine = commits.upload_files(rt.store, folder, local)
    everyone = rt.gather(mine)
    if rt.is_main:
        files = {name: entry for part in everyone for name, entry in part.items()}
        commits.write_marker(rt.store, folder, step, files, metrics, rt.run.spec_hash)
        commits.prune_checkpoints(rt.store, rt.stage, keep=KEEP)
    rt.barrier()
    shutil.rmtree(local, ignore_errors=True)


def latest(rt: Runtime) -> commits.Manifest | None:
    """The newest committed checkpoint of this stage under the current spec (rank 0 decides)."""
    manifest = None
    if rt.is_main:
        manifest = commits.latest_checkpoint(rt.store, rt.stage, rt.run.spec_hash)
    return rt.broadcast(manifest)


def load(rt: Runtime, engine, manifest: commits.Manifest) -> dict[str, Any]:
    """Restore DeepSpeed state from a committed checkpoint; the loop state it saved."""
    local = commits.fetch(rt.store, manifest, rt.workdir / "resume")
    path, client = engine.load_checkpoint(str(local), tag=TAG)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {manifest.folder}")
    shutil.rmtree(local, ignore_errors=True)
    return client["amber"]
