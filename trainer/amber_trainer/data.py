"""Training and calibration data: clean latents with their text embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amber_trainer.forward import FlowInputs


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
    """Random data shaped for a model config: latent_size x latent_size VAE latents, packed 2x2."""
    gen = torch.Generator().manual_seed(seed)
    side = latent_size // config.get("patch_size", 2)
    channels = config.get("in_channels", 64)
    width = config.get("joint_attention_dim", 3584)
    batches = []
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        mask = torch.ones(n, text_tokens, dtype=torch.long)
        # Variable prompt lengths, as real captions have: pad the tail of some samples.
        lengths = torch.randint(max(1, text_tokens // 2), text_tokens + 1, (n,), generator=gen)
        for i, length in enumerate(lengths):
            mask[i, length:] = 0
        batches.append(
            Batch(
                latents=torch.randn(n, side * side, channels, generator=gen),
                text=torch.randn(n, text_tokens, width, generator=gen),
                text_mask=mask,
                img_shapes=[[(1, side, side)]] * n,
            )
        )
    return batches
