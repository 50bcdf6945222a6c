"""The transformer's forward pass in three pieces: embed, blocks, head.

Scoring skips blocks and distillation reads and feeds hidden states between blocks, so the
stages need the forward of `QwenImageTransformer2DModel` (diffusers 0.42) cut at its block
boundaries. `embed` and `head` copy the code before and after its block loop; a test checks
that `velocity()` equals `model(...)` bit for bit, so a diffusers change that breaks the copy
fails CI instead of silently skewing scores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from math import prod

import torch
from diffusers.models.transformers.transformer_qwenimage import (
    compute_text_seq_len_from_mask,
)
from torch import nn


@dataclass
class FlowInputs:
    """One batch as the transformer sees it."""

    hidden_states: torch.Tensor  # (B, N, C) packed noisy latents x_t
    encoder_hidden_states: torch.Tensor  # (B, T, joint_attention_dim) text embeddings
    encoder_hidden_states_mask: torch.Tensor | None  # (B, T), 1 = real token
    timestep: torch.Tensor  # (B,) flow time t in [0, 1]
    img_shapes: list[list[tuple[int, int, int]]]  # per sample: [(frames, H/2, W/2)]


def concat(parts: list[FlowInputs]) -> FlowInputs:
    """One batch of the rows of `parts`, in order (their text padded to the same length)."""
    masks = [p.encoder_hidden_states_mask for p in parts]
    return FlowInputs(
        torch.cat([p.hidden_states for p in parts]),
        torch.cat([p.encoder_hidden_states for p in parts]),
        None if any(m is None for m in masks) else torch.cat(masks),
        torch.cat([p.timestep for p in parts]),
        [shape for p in parts for shape in p.img_shapes],
    )


@dataclass
class Conditioning:
    """What every block receives besides the two streams."""

    temb: torch.Tensor  # (B, D), or (2B, D) with zero_cond_t
    rotary: tuple[torch.Tensor, torch.Tensor]  # image and text RoPE frequencies
    mask: torch.Tensor | None  # (B, T) bool
    modulate_index: torch.Tensor | None  # (B, N) with zero_cond_t


def embed(model: nn.Module, x: FlowInputs) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """Image and text streams entering block 0, and the blocks' conditioning."""
    img = model.img_in(x.hidden_states)  # (B, N, D)
    timestep = x.timestep.to(img.dtype)
    modulate_index = None
    if model.zero_cond_t:
        timestep = torch.cat([timestep, timestep * 0], dim=0)
        modulate_index = torch.tensor(
            [[0] * prod(s[0]) + [1] * sum(prod(r) for r in s[1:]) for s in x.img_shapes],
            device=timestep.device,
            dtype=torch.int,
        )
    txt = model.txt_in(model.txt_norm(x.encoder_hidden_states))  # (B, T, D)
    text_len, _, mask = compute_text_seq_len_from_mask(txt, x.encoder_hidden_states_mask)
    temb = model.time_text_embed(timestep, img)
    rotary = model.pos_embed(x.img_shapes, max_txt_seq_len=text_len, device=img.device)
    return img, txt, Conditioning(temb, rotary, mask, modulate_index)


def run_block(
    block: nn.Module, img: torch.Tensor, txt: torch.Tensor, cond: Conditioning
) -> tuple[torch.Tensor, torch.Tensor]:
    txt, img = block(
        hidden_states=img,
        encoder_hidden_states=txt,
        encoder_hidden_states_mask=cond.mask,
        temb=cond.temb,
        image_rotary_emb=cond.rotary,
        modulate_index=cond.modulate_index,
    )
    return img, txt


def run_blocks(
    blocks: Iterable[nn.Module], img: torch.Tensor, txt: torch.Tensor, cond: Conditioning
) -> tuple[torch.Tensor, torch.Tensor]:
    for block in blocks:
        img, txt = run_block(block, img, txt, cond)
    return img, txt


def head(model: nn.Module, img: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """Velocity from the last block's image stream: (B, N, patch² x out_channels)."""
    temb = cond.temb.chunk(2, dim=0)[0] if model.zero_cond_t else cond.temb
    return model.proj_out(model.norm_out(img, temb))


def velocity(model: nn.Module, x: FlowInputs, skip: Iterable[int] = ()) -> torch.Tensor:
    """The model's prediction with the blocks in `skip` replaced by the identity."""
    skipped = set(skip)
    img, txt, cond = embed(model, x)
    blocks = (b for i, b in enumerate(model.transformer_blocks) if i not in skipped)
    img, _ = run_blocks(blocks, img, txt, cond)
    return head(model, img, cond)


def diffusers_forward(model: nn.Module, x: FlowInputs) -> torch.Tensor:
    """The model's own `forward` on the same inputs: the reference the pieces above match,
    and what a plain diffusers training loop calls."""
    return model(
        hidden_states=x.hidden_states,
        encoder_hidden_states=x.encoder_hidden_states,
        encoder_hidden_states_mask=x.encoder_hidden_states_mask,
        timestep=x.timestep,
        img_shapes=x.img_shapes,
        return_dict=False,
    )[0]
