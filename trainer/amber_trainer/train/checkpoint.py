"""Training checkpoints in the store: DeepSpeed state plus the loop's own, marker last.

Every process saves its own DeepSpeed files (ZeRO shards its optimizer state per rank) to
local scratch and uploads them; rank 0 gathers their sizes and checksums and writes the
commit marker only after all of them are in the store. Data position and noise are pure
functions of the step (see `data.Sampler`), so the step number is all the loop needs to
continue exactly where it stopped.

A checkpoint records the number of processes that wrote it. Resumed by another number (the
resource's `pods` changed, or `amber run --nproc`), DeepSpeed cannot read its optimizer
state back: ZeRO partitions it per rank, and one process trains without ZeRO. The weights,
the step (so the data position), the learning-rate schedule, the loss history and the
moving average are restored as always, and AdamW's moments are read from the files by
parameter name and handed to the new engine's partitions (`moments`): the stage goes on
as if it had never stopped, with a line that says the world changed.
"""

from __future__ import annotations

import shutil
from typing import Any

from amber import commits
from amber_trainer.runtime import Runtime
from amber_trainer.train import moments

TAG = "state"
KEEP = 2  # committed checkpoints kept per stage: the newest, and one in case it is bad
WORLD = "world"  # in a checkpoint's marker: how many processes wrote it


def save(rt: Runtime, engine, step: int, state: dict[str, Any], metrics: dict) -> None:
    """Collective: every rank calls it at the same step."""
    local = rt.workdir / "checkpoint"
    shutil.rmtree(local, ignore_errors=True)
    client = {"amber": state, moments.NAMES: moments.trainable_names(engine.module)}
    engine.save_checkpoint(str(local), tag=TAG, client_state=client)
    folder = f"{rt.stage}/{commits.checkpoint_folder(step)}"
    mine = commits.upload_files(rt.store, folder, local)
    everyone = rt.gather(mine)
    if rt.is_main:
        files = {name: entry for part in everyone for name, entry in part.items()}
        metrics = {**metrics, WORLD: rt.world}
        commits.write_marker(rt.store, folder, step, files, metrics, rt.run.spec_hash, rt.fence)
        commits.prune_checkpoints(rt.store, rt.stage, keep=KEEP)
    rt.barrier()
    shutil.rmtree(local, ignore_errors=True)


def resume(rt: Runtime, engine, accept=lambda manifest: True, **context):
    """Restore the newest good checkpoint: (manifest, the loop state it saved), or None to
    start afresh (there is none, or `accept` refuses it). One whose files fail their
    checksums on any rank is quarantined and the next older one tried: a damaged checkpoint
    costs steps, never the run. `context` goes into the `resumed` event."""
    candidates = None
    if rt.is_main:
        candidates = list(commits.checkpoints(rt.store, rt.stage, rt.run.spec_hash, rt.warn))
    for manifest in rt.broadcast(candidates):
        if not accept(manifest):
            return None
        local = rt.workdir / "resume"
        shutil.rmtree(local, ignore_errors=True)
        try:
            commits.fetch(rt.store, manifest, local)
            problem = ""
        except commits.CorruptCommit as err:
            problem = err.reason
        problems = [p for p in rt.gather(problem) if p]
        if problems:
            if rt.is_main:
                place = commits.quarantine(rt.store, manifest.folder, problems[0])
                rt.warn(
                    f"checkpoint {manifest.folder} is damaged ({problems[0]}): "
                    f"quarantined in {place}; trying an older one"
                )
            rt.barrier()
            continue
        written = manifest.metrics.get(WORLD, rt.world)
        same = written == rt.world
        path, client = engine.load_checkpoint(str(local), tag=TAG, load_optimizer_states=same)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {manifest.folder}")
        if not same:
            _reshard(rt, engine, manifest.folder, local / TAG, client, written)
        shutil.rmtree(local, ignore_errors=True)
        rt.log("resumed", step=manifest.step, checkpoint=manifest.folder, world=written, **context)
        return manifest, client["amber"]
    return None


def resume_state(rt: Runtime, engine, phase: str | None = None) -> dict | None:
    """The loop state of the newest good checkpoint, restored into `engine` (its weights,
    optimizer and schedule), or None to start afresh. A stage trained in parts (fuse's
    phases) resumes only from a checkpoint of the same `phase`."""
    if phase is None:
        resumed = resume(rt, engine)
    else:
        resumed = resume(rt, engine, lambda m: m.metrics.get("label") == phase, phase=phase)
    return resumed[1] if resumed else None


def _reshard(rt: Runtime, engine, folder: str, files, client: dict, written: int) -> None:
    """The optimizer's moments of a checkpoint written by `written` processes, into this
    attempt's engine; said either way."""
    moments.sync_learning_rate(engine)
    why = ""
    try:
        found = moments.read(files, client.get(moments.NAMES))
        if found is None:
            why = "the checkpoint does not name its parameters' moments"
        else:
            mismatched = moments.put(engine, *found)
            if mismatched:
                why = f"{len(mismatched)} parameters' moments have another shape ({mismatched[0]})"
    except (KeyError, AttributeError, RuntimeError, ValueError) as err:
        # A DeepSpeed whose files or optimizer changed shape: the stage still goes on.
        why = f"{type(err).__name__}: {err}"
    if not why:
        rt.log("resharded", checkpoint=folder, written=written, world=rt.world)
        return
    rt.warn(
        f"checkpoint {folder} was written by {written} processes and this attempt has "
        f"{rt.world}: weights, step, schedule and history restored, the optimizer's moments "
        f"start afresh ({why})"
    )
