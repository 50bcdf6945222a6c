"""Teacher targets computed once: a fixed pool of flow-matching inputs with the frozen
teacher's answers to them.

A pool entry is a training row, its noise ε and its time t (so x_t = (1-t)·x0 + t·ε), the
teacher's velocity at x_t and, optionally, the teacher's (image, text) hidden states entering
every block and leaving the last. Distillation and fine-tuning against a frozen teacher
recompute exactly these on every step; with a pool they read them instead, so every run that
shares a teacher and data (the benchmark's arms and seeds) spends its compute on students.

A pool is drawn for one timestep distribution (`sampling`, a `TimestepSampling`): a stage
uses it only when its own distribution is the same, and only for the teacher whose weights
it was computed from (`fingerprint`), else it computes targets live. Pools live beside the
data shards, in `{data.cacheUri}/teacher-targets/{sampling}/`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from amber.stages import FinetuneStage
from amber_trainer.data import Batch, TensorDataset
from amber_trainer.model.forward import FlowInputs
from amber_trainer.train.objectives import sample_timesteps, teacher_states

FOLDER = "teacher-targets"
FILE = "targets.safetensors"


@dataclass(frozen=True)
class TimestepSampling:
    """How training times are drawn; its `key` names a pool's folder."""

    kind: str  # uniform | logit-normal | shifted
    mean: float = 0.0
    std: float = 1.0
    shift: float = 3.0

    @property
    def key(self) -> str:
        if self.kind == "logit-normal":
            return f"logit-normal-{self.mean:g}-{self.std:g}"
        if self.kind == "shifted":
            return f"shifted-{self.shift:g}"
        return self.kind

    def draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return sample_timesteps(self.kind, n, gen, self.mean, self.std, self.shift)


UNIFORM = TimestepSampling("uniform")


def sampling_of(params) -> TimestepSampling:
    """A stage's timestep distribution: finetune's `timestepSampling`; other stages (fuse's
    closing fine-tune) draw uniformly."""
    if not isinstance(params, FinetuneStage):
        return UNIFORM
    return TimestepSampling(
        params.timestep_sampling, params.logit_mean, params.logit_std, params.shift
    )


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's weights (names, shapes, dtypes and bytes, in state order)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Pool:
    rows: torch.Tensor  # (n,) training-row index of each entry
    noise: torch.Tensor  # (n, N, C) ε
    timestep: torch.Tensor  # (n,) t
    velocity: torch.Tensor  # (n, N, C_out) the teacher's velocity at x_t
    states: dict[int, tuple[torch.Tensor, torch.Tensor]] | None  # boundary -> (img, txt)
    teacher: str  # fingerprint of the teacher's weights
    sampling: str  # TimestepSampling.key
    train_rows: int  # rows of the training split the entries index

    def __len__(self) -> int:
        return len(self.rows)

    def inputs(
        self, train: TensorDataset, entries: list[int], device=None
    ) -> tuple[Batch, FlowInputs, torch.Tensor]:
        """The entries' clean batch, their x_t and their flow-matching target ε - x0."""
        idx = torch.as_tensor(entries, dtype=torch.long)
        batch = train.rows(self.rows[idx].tolist(), device)
        noise = self.noise[idx].to(device)
        return batch, batch.noised(self.timestep[idx].to(device), noise), noise - batch.latents

    def teacher_outputs(self, entries: list[int], boundaries, device=None):
        """(states at `boundaries`, velocity) for the entries, as `teacher_states` returns."""
        idx = torch.as_tensor(entries, dtype=torch.long)
        if boundaries and self.states is None:
            raise ValueError("this pool holds no hidden states")
        states = {
            b: (self.states[b][0][idx].to(device), self.states[b][1][idx].to(device))
            for b in boundaries
        }
        return states, self.velocity[idx].to(device)


@torch.no_grad()
def build(
    teacher: torch.nn.Module,
    train: TensorDataset,
    size: int,
    sampling: TimestepSampling,
    seed: int,
    with_states: bool,
    batch_size: int = 64,
    on_batch=None,
) -> Pool:
    """`size` entries over the training rows (seeded), with the teacher's targets."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, len(train), (size,), generator=gen)
    noise = torch.randn((size, *train.latents.shape[1:]), generator=gen)
    timestep = sampling.draw(size, gen)
    layers = len(teacher.transformer_blocks)
    boundaries = list(range(layers + 1)) if with_states else []
    velocities, img, txt = [], [], []
    for start in range(0, size, batch_size):
        part = slice(start, start + batch_size)
        batch = train.rows(rows[part].tolist())
        states, v = teacher_states(teacher, batch.noised(timestep[part], noise[part]), boundaries)
        velocities.append(v)
        if with_states:
            img.append(torch.stack([states[b][0] for b in boundaries], 1))
            txt.append(torch.stack([states[b][1] for b in boundaries], 1))
        if on_batch:
            on_batch(start + batch_size)
    stacked = None
    if with_states:
        all_img, all_txt = torch.cat(img), torch.cat(txt)
        stacked = {b: (all_img[:, b], all_txt[:, b]) for b in boundaries}
    return Pool(
        rows,
        noise,
        timestep,
        torch.cat(velocities),
        stacked,
        fingerprint(teacher),
        sampling.key,
        len(train),
    )


def save(pool: Pool, data_folder: Path) -> Path:
    folder = Path(data_folder) / FOLDER / pool.sampling
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "rows": pool.rows,
        "noise": pool.noise,
        "timestep": pool.timestep,
        "velocity": pool.velocity,
    }
    for b, (img, txt) in (pool.states or {}).items():
        tensors[f"img.{b}"], tensors[f"txt.{b}"] = img, txt
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"teacher": pool.teacher, "sampling": pool.sampling, "trainRows": pool.train_rows}
    save_file(tensors, str(folder / FILE), metadata={"pool": json.dumps(meta)})
    return folder / FILE


def load(data_folder: Path, sampling: TimestepSampling, boundaries=()) -> Pool | None:
    """The pool for `sampling` beside the data, with the states at `boundaries` only (a
    distillation reads the boundaries of its spans), or None when there is none."""
    path = Path(data_folder) / FOLDER / sampling.key / FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["pool"])
        keys = set(f.keys())
        if any(f"img.{b}" not in keys for b in boundaries):
            return None  # no hidden states (or not these): targets are computed live
        get = f.get_tensor
        states = {b: (get(f"img.{b}"), get(f"txt.{b}")) for b in boundaries} or None
        return Pool(
            get("rows"),
            get("noise"),
            get("timestep"),
            get("velocity"),
            states,
            meta["teacher"],
            meta["sampling"],
            meta["trainRows"],
        )
