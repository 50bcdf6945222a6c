"""Training and calibration data: clean latents with their text embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from amber.errors import StorageError
from amber_trainer.model.forward import FlowInputs


@dataclass
class Batch:
    latents: torch.Tensor  # (B, N, C) clean packed latents x0
    text: torch.Tensor  # (B, T, joint_attention_dim) text embeddings c
    text_mask: torch.Tensor  # (B, T) 1 = real token
    img_shapes: list[list[tuple[int, int, int]]]  # per sample: [(1, H/2, W/2)]

    def noised(self, t: torch.Tensor, noise: torch.Tensor) -> FlowInputs:
        """Rectified-flow inputs at time t: x_t = (1 - t)·x0 + t·ε, with t of shape (B,)."""
        tt = t.to(self.latents.dtype)[:, None, None]
        return FlowInputs(
            hidden_states=(1 - tt) * self.latents + tt * noise,
            encoder_hidden_states=self.text,
            encoder_hidden_states_mask=self.text_mask,
            timestep=t,
            img_shapes=self.img_shapes,
        )

    def __len__(self) -> int:
        return self.latents.shape[0]


def synthetic(
    config: dict,
    samples: int,
    latent_size: int = 8,
    text_tokens: int = 8,
    batch_size: int = 4,
    seed: int = 0,
) -> list[Batch]:
    """Data shaped for a model config: latent_size² VAE latents (packed 2x2) and captions.

    Latents depend on their caption (a fixed projection of its mean embedding) plus a fixed
    spatial pattern and some noise, so there is something to learn: a model that reads the
    text beats one that does not, and flow-matching losses can fall well below their
    unconditional level.
    """
    gen = torch.Generator().manual_seed(seed)
    side = latent_size // config.get("patch_size", 2)
    channels = config.get("in_channels", 64)
    width = config.get("joint_attention_dim", 3584)
    # The "world" is fixed across seeds; only the samples drawn from it change.
    world = torch.Generator().manual_seed(1234)
    projection = torch.randn(width, channels, generator=world) / width**0.5
    pattern = torch.randn(side * side, channels, generator=world)
    batches = []
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        mask = torch.ones(n, text_tokens, dtype=torch.long)
        # Variable prompt lengths, as real captions have: pad the tail of some samples.
        lengths = torch.randint(max(1, text_tokens // 2), text_tokens + 1, (n,), generator=gen)
        for i, length in enumerate(lengths):
            mask[i, length:] = 0
        text = torch.randn(n, text_tokens, width, generator=gen)
        caption = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (n, width)
        content = (caption @ projection)[:, None, :] * 2 + 0.5 * pattern  # (n, N, C)
        latents = content + 0.3 * torch.randn(n, side * side, channels, generator=gen)
        batches.append(
            Batch(
                latents=latents,
                text=text,
                text_mask=mask,
                img_shapes=[[(1, side, side)]] * n,
            )
        )
    return batches


class TensorDataset:
    """Encoded pairs held as tensors: rows are (latents, text, mask) with one image size."""

    def __init__(self, latents, text, text_mask, side: int):
        self.latents = latents  # (n, N, C)
        self.text = text  # (n, T, D)
        self.text_mask = text_mask  # (n, T)
        self.side = side  # packed latent side: N = side²

    def __len__(self) -> int:
        return self.latents.shape[0]

    def rows(self, indices: list[int], device=None, dtype: torch.dtype | None = None) -> Batch:
        """A batch of these rows on `device`; `dtype` casts latents and text (a bf16 model
        on a GPU reads bf16, whatever precision the shards were written in)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Batch(
            latents=self.latents[idx].to(device, dtype),
            text=self.text[idx].to(device, dtype),
            text_mask=self.text_mask[idx].to(device),
            img_shapes=[[(1, self.side, self.side)]] * len(indices),
        )

    def split(self, held_out_fraction: float = 0.05) -> tuple[TensorDataset, TensorDataset]:
        """Training rows and held-out rows (the last ones), never overlapping."""
        held = max(1, int(len(self) * held_out_fraction))
        cut = len(self) - held

        def part(s):
            return TensorDataset(self.latents[s], self.text[s], self.text_mask[s], self.side)

        return part(slice(0, cut)), part(slice(cut, None))


def synthetic_dataset(config: dict, samples: int, latent_size: int, text_tokens: int, seed: int):
    batches = synthetic(config, samples, latent_size, text_tokens, batch_size=samples, seed=seed)
    b = batches[0]
    return TensorDataset(b.latents, b.text, b.text_mask, b.img_shapes[0][0][1])


def shapes_datasets(config: dict, samples: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """The shapes task's pairs (`data.shapes`): `samples` renderings of its training
    combinations, and one rendering of every held-out combination (never trained on)."""
    from amber_trainer.quality import task, text
    from amber_trainer.quality.fixtures import dataset

    wrong = task.misfit(config)
    if wrong:
        raise ValueError(
            f"data.shapes: the task's tokens are {task.CHANNELS} values and its captions "
            f"{text.WIDTH}-wide MiniLM states; the teacher has {wrong}"
        )
    train, held_out = task.split()
    parts = [dataset(train, samples, seed), dataset(held_out, len(held_out), seed + 1)]
    return tuple(TensorDataset(*part[:3], task.SIDE) for part in parts)


def load_shards(paths: list) -> TensorDataset:
    """Encoded safetensors shards (from the encode stage) as one dataset."""
    parts = [_shard(Path(p)) for p in sorted(paths)]
    if not parts:
        raise StorageError("no encoded shards found")
    side = int(parts[0]["side"].item())
    return TensorDataset(
        torch.cat([p["latents"] for p in parts]),
        torch.cat([p["text"] for p in parts]),
        torch.cat([p["text_mask"] for p in parts]),
        side,
    )


SHARD_KEYS = ("latents", "text", "text_mask", "side")


def _shard(path: Path) -> dict[str, torch.Tensor]:
    """One encoded shard, or a StorageError naming it: empty, cut short (safetensors says
    only 'header too small'), or without the tensors an encoded shard holds."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise StorageError(f"data shard {path}: damaged or cut short ({err})") from None
    missing = [key for key in SHARD_KEYS if key not in tensors]
    if missing:
        raise StorageError(f"data shard {path}: no {', '.join(missing)}; not an encoded shard")
    return tensors


class Sampler:
    """Which rows and which noise a process uses at a micro-step: pure functions of the step.

    Position p = (micro_step * world + rank) * micro_batch + k walks seeded permutations of the
    dataset, one per epoch. Nothing needs saving to resume: the step number is the position.
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=gen)}
        return self._perms[epoch]

    def indices(self, micro_step: int, rank: int, world: int, micro_batch: int) -> list[int]:
        start = (micro_step * world + rank) * micro_batch
        return [
            int(self._perm(p // self.size)[p % self.size])
            for p in range(start, start + micro_batch)
        ]

    def generator(self, micro_step: int, rank: int) -> torch.Generator:
        """Noise and timestep randomness for one process at one micro-step."""
        return torch.Generator().manual_seed(hash((self.seed, micro_step, rank)) & (2**62 - 1))


def noised(batch: Batch, t: torch.Tensor, gen: torch.Generator) -> tuple[FlowInputs, torch.Tensor]:
    """x_t for times t, and the flow-matching target ε - x0."""
    noise = torch.randn(batch.latents.shape, generator=gen, dtype=batch.latents.dtype)
    noise = noise.to(batch.latents.device)
    return batch.noised(t.to(batch.latents.device), noise), noise - batch.latents
