"""AdamW's moments by parameter name: read from a DeepSpeed checkpoint written by any number
of processes, put into an engine of any number. This is what lets a stage resumed on
another number of GPUs go on with its optimizer's state instead of from zero.

Under ZeRO-1/2 each rank's file holds its slice of one flat fp32 vector per parameter
group (`exp_avg` and `exp_avg_sq` laid out as the fp32 weights are, which DeepSpeed's own
`zero_to_fp32` reassembles the same way): the vectors are the rank slices end to end, and
a parameter is the next `numel` entries, then its alignment padding. One process without
ZeRO keeps torch's per-parameter state, in the order the parameters were handed to the
optimizer; the checkpoint records their names (`NAMES` in its client state).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from deepspeed.utils import safe_set_full_optimizer_state

KEYS = ("exp_avg", "exp_avg_sq")
NAMES = "parameters"  # client-state key: the trainable parameters' names, in order
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")

Moments = dict[str, dict[str, torch.Tensor]]  # parameter name -> {exp_avg, exp_avg_sq}


def trainable_names(module: torch.nn.Module) -> list[str]:
    """In the order `loop.make_engine` hands the parameters to DeepSpeed."""
    return [name for name, p in module.named_parameters() if p.requires_grad]


def read(folder: Path, names: list[str] | None) -> tuple[Moments, float] | None:
    """The moments and the optimizer's step count in checkpoint `folder` (one tag's files),
    whatever number of processes wrote it; None where they cannot be known (a checkpoint
    from before names were recorded, or an optimizer without these moments)."""
    ranks = sorted(
        (int(m.group(1)), path) for path in folder.iterdir() if (m := _RANK_FILE.match(path.name))
    )
    model = torch.load(
        folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    if ranks:
        return _from_zero(model, [path for _, path in ranks])
    # torch's state is keyed by position, and only parameters that have had a gradient
    # have any (the others' moments are zero).
    state = (model.get("optimizer") or {}).get("state") or {}
    if names is None or any(i >= len(names) or not set(KEYS) <= set(s) for i, s in state.items()):
        return None
    moments = {names[i]: {k: entry[k] for k in KEYS} for i, entry in state.items()}
    step = max((float(entry["step"]) for entry in state.values()), default=0.0)
    return moments, step


def _from_zero(model: dict, files: list[Path]) -> tuple[Moments, float] | None:
    # mmap: a rank takes what it needs from each file, not every file into memory.
    parts = [
        torch.load(f, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
        for f in files
    ]
    paddings = parts[0].get("param_alignment_paddings")
    moments: Moments = {}
    step = 0.0
    for group, shapes in enumerate(model["param_shapes"]):
        states = [part["base_optimizer_state"]["state"][group] for part in parts]
        if not all(set(KEYS) <= set(s) for s in states):
            return None
        step = float(states[0]["step"])
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = torch.Size(shape).numel()
            moments[name] = {
                k: _span([s[k] for s in states], offset, numel).view(shape) for k in KEYS
            }
            offset += numel + (paddings[group][index] if paddings else 0)
    return moments, step


def _span(slices: list[torch.Tensor], offset: int, numel: int) -> torch.Tensor:
    """Entries [offset, offset + numel) of the rank slices laid end to end."""
    pieces, start = [], 0
    for part in slices:
        end = start + part.numel()
        lo, hi = max(offset, start), min(offset + numel, end)
        if lo < hi:
            pieces.append(part[lo - start : hi - start])
        start = end
    return torch.cat(pieces).clone()


def sync_learning_rate(engine) -> None:
    """Put the schedule's current learning rate back into the optimizer: DeepSpeed restores
    the schedule's position, but the rate itself lives in the optimizer state it could not
    read, and the first step after the resume would take the rate of step 0."""
    scheduler = engine.lr_scheduler
    if scheduler is not None:
        scheduler.step(scheduler.last_batch_iteration)


@torch.no_grad()
def put(engine, moments: Moments, step: float) -> list[str]:
    """Set the engine's moments and step count from `moments` (a parameter without any has
    never had a gradient: its moments stay zero); the names of parameters whose moments
    have another shape, which are left at zero too."""
    optimizer = engine.optimizer
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    mismatched = [n for n, p in named if n in moments and moments[n][KEYS[0]].shape != p.shape]
    named = [(n, p) for n, p in named if n in moments and n not in mismatched]
    if isinstance(optimizer, torch.optim.Optimizer):  # one process, no ZeRO: torch's AdamW
        fused = any(group.get("fused") for group in optimizer.param_groups)
        for name, param in named:
            optimizer.state[param] = {
                "step": torch.tensor(step, device=param.device if fused else "cpu"),
                **{k: moments[name][k].to(param.device, torch.float32).clone() for k in KEYS},
            }
        return mismatched
    # ZeRO-1/2: torch's AdamW under it creates its state at the first step, and DeepSpeed
    # links each parameter to its slice of that state then; create and link them now.
    for flat in optimizer.single_partition_of_fp32_groups:
        optimizer.optimizer.state[flat] = {
            "step": torch.tensor(step),
            **{k: torch.zeros_like(flat) for k in KEYS},
        }
    optimizer._hp_optimizer_states_linked = False
    optimizer._lazy_init_hp_params_optimizer_state()
    for name, param in named:  # each rank keeps its own slice of the full tensor
        for k in KEYS:
            safe_set_full_optimizer_state(param, moments[name][k].to(param.device), k)
    return mismatched
