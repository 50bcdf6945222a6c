"""The hybrid-stream transformer of Amber-Image-6B: dual-stream blocks, then single-stream ones.

A single-stream block processes text and image tokens as one sequence with the *image*
branch's weights of the dual-stream block it came from (modulation, norms, q/k/v, q/k RMSNorm,
output projection, MLP); the text branch is gone, which roughly halves the block's parameters
but not its FLOPs per token (attention and MLP still run on every token).

With `single_text_rank` r > 0 a single block also keeps a rank-r correction of q, k and v
for text tokens only (`text_down`: D -> r, `text_up`: r -> 3D, added to the shared
projections of the text positions): how the image tokens read the prompt is what one shared
projection cannot serve for both streams, and (4r + 3)D parameters restore most of it
(docs/design.md, "fuse"). r = 0 is the paper's single stream.

To stay a drop-in for `QwenImagePipeline`, the model subclasses diffusers'
`QwenImageTransformer2DModel` and keeps every block in `transformer_blocks`: the deepest
`num_single_layers` entries are `AmberSingleStreamBlock`s with the dual block's call signature,
so the parent's forward, caching hooks, gradient checkpointing and `save_pretrained` /
`from_pretrained` apply unchanged. Parameter names of a single block equal the image-branch
names of a dual block, so conversion is a filtered state-dict copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_qwenimage import (
    QwenImageTransformer2DModel,
    apply_rotary_emb_qwen,
)
from torch import nn

TEXT_BRANCH_PREFIXES = (
    "txt_mod.",
    "txt_norm1.",
    "txt_norm2.",
    "txt_mlp.",
    "attn.add_q_proj.",
    "attn.add_k_proj.",
    "attn.add_v_proj.",
    "attn.to_add_out.",
    "attn.norm_added_q.",
    "attn.norm_added_k.",
)


class AmberSingleStreamAttnProcessor:
    """Self-attention over the joint [text, image] sequence with image-branch projections."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,  # (B, T+N, D): text tokens first, as in the dual block
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, T+N) bool, True = attend
        image_rotary_emb: torch.Tensor | None = None,  # (T+N, head_dim/2) complex
        text_qkv: torch.Tensor | None = None,  # (B, T, 3D): added to the text tokens' q, k, v
    ) -> torch.Tensor:
        head_dim = attn.inner_dim // attn.heads
        query, key, value = (p(hidden_states) for p in (attn.to_q, attn.to_k, attn.to_v))
        if text_qkv is not None:  # text positions come first
            text_len = text_qkv.shape[1]
            query, key, value = (
                torch.cat([p[:, :text_len] + delta, p[:, text_len:]], 1)
                for p, delta in zip((query, key, value), text_qkv.chunk(3, -1), strict=True)
            )
        query, key, value = (p.unflatten(-1, (-1, head_dim)) for p in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb_qwen(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb_qwen(key, image_rotary_emb, use_real=False)
        if attention_mask is not None:
            attention_mask = attention_mask[:, None, None, :]  # (B, 1, 1, S)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)
        out = attn.to_out[0](out.contiguous())
        return attn.to_out[1](out)


class AmberSingleStreamBlock(nn.Module):
    """A dual-stream block's image branch applied to the joint text+image sequence.

    Args:
        dim (`int`): hidden width (heads x head dim).
        num_attention_heads (`int`): attention heads.
        attention_head_dim (`int`): width of one head.
        qk_norm (`str`, defaults to `"rms_norm"`): normalisation of queries and keys.
        eps (`float`, defaults to `1e-6`): norm epsilon.
        text_rank (`int`, defaults to `0`): rank of the text tokens' own q, k, v correction.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        qk_norm: str = "rms_norm",
        eps: float = 1e-6,
        text_rank: int = 0,
    ):
        super().__init__()
        self.text_rank = text_rank
        if text_rank:
            self.text_down = nn.Linear(dim, text_rank, bias=False)
            self.text_up = nn.Linear(text_rank, 3 * dim, bias=True)
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = Attention(
            query_dim=dim,
            dim_head=attention_head_dim,
            heads=num_attention_heads,
            out_dim=dim,
            bias=True,
            qk_norm=qk_norm,
            eps=eps,
            processor=AmberSingleStreamAttnProcessor(),
        )
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_mlp = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    @staticmethod
    def _modulate(x, mod_params, index=None):
        # Same arithmetic as QwenImageTransformerBlock._modulate, with per-token selection
        # between the two halves of a doubled batch when zero_cond_t is on.
        shift, scale, gate = mod_params.chunk(3, dim=-1)  # each (B or 2B, D)
        if index is None:
            shift, scale, gate = shift[:, None], scale[:, None], gate[:, None]
        else:
            half = shift.size(0) // 2
            pick = index[..., None] == 0  # (B, S, 1)
            shift = torch.where(pick, shift[:half, None], shift[half:, None])
            scale = torch.where(pick, scale[:half, None], scale[half:, None])
            gate = torch.where(pick, gate[:half, None], gate[half:, None])
        return x * (1 + scale) + shift, gate

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, N, D) image tokens
        encoder_hidden_states: torch.Tensor,  # (B, T, D) text tokens
        encoder_hidden_states_mask: torch.Tensor | None,  # (B, T) bool
        temb: torch.Tensor,  # (B, D), or (2B, D) with zero_cond_t
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        modulate_index: torch.Tensor | None = None,  # (B, N) with zero_cond_t
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, normed2, gate2 = self.attend(
            hidden_states,
            encoder_hidden_states,
            encoder_hidden_states_mask,
            temb,
            image_rotary_emb,
            joint_attention_kwargs,
            modulate_index,
        )
        x = x + gate2 * self.img_mlp(normed2)
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        text_len = encoder_hidden_states.shape[1]
        return x[:, :text_len], x[:, text_len:]

    def attend(
        self,
        hidden_states: torch.Tensor,  # (B, N, D) image tokens
        encoder_hidden_states: torch.Tensor,  # (B, T, D) text tokens
        encoder_hidden_states_mask: torch.Tensor | None,  # (B, T) bool
        temb: torch.Tensor,  # (B, D), or (2B, D) with zero_cond_t
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        modulate_index: torch.Tensor | None = None,  # (B, N) with zero_cond_t
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block up to its MLP, on the joint sequence (text first): the residual stream
        x after attention, the MLP's input and its gate; the block returns x + gate *
        img_mlp(input), split back into text and image."""
        text_len = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, T+N, D)

        index = None
        if modulate_index is not None:
            # Text tokens take the real timestep's modulation, like the dual block's text branch.
            text_index = modulate_index.new_zeros(modulate_index.shape[0], text_len)
            index = torch.cat([text_index, modulate_index], dim=1)
        mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = encoder_hidden_states_mask.new_ones(hidden_states.shape[:2])
            mask = torch.cat([encoder_hidden_states_mask.bool(), image_mask.bool()], dim=1)
        rotary = None
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            rotary = torch.cat([txt_freqs, img_freqs], dim=0)

        mod1, mod2 = self.img_mod(temb).chunk(2, dim=-1)  # each (B, 3D)
        normed, gate1 = self._modulate(self.img_norm1(x), mod1, index)
        text_qkv = self.text_up(self.text_down(normed[:, :text_len])) if self.text_rank else None
        attn_out = self.attn(
            hidden_states=normed,
            attention_mask=mask,
            image_rotary_emb=rotary,
            text_qkv=text_qkv,
            **(joint_attention_kwargs or {}),
        )
        x = x + gate1 * attn_out
        normed2, gate2 = self._modulate(self.img_norm2(x), mod2, index)
        return x, normed2, gate2


class AmberHybridTransformer2DModel(QwenImageTransformer2DModel):
    """Qwen-Image transformer whose deepest `num_single_layers` blocks are single-stream.

    Args:
        num_layers (`int`, defaults to `60`): all blocks, dual and single.
        num_single_layers (`int`, defaults to `0`): the deepest blocks that are single-stream.
        single_text_rank (`int`, defaults to `0`): rank of each single block's text q, k, v
            correction (0: none).
        Other arguments: as `QwenImageTransformer2DModel`.
    """

    _no_split_modules = ["QwenImageTransformerBlock", "AmberSingleStreamBlock"]  # noqa: RUF012
    _repeated_blocks = ["QwenImageTransformerBlock", "AmberSingleStreamBlock"]  # noqa: RUF012
    # The parent's tensor-parallel plan names text-branch weights single blocks do not have.
    _tp_plan = None

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 64,
        out_channels: int | None = 16,
        num_layers: int = 60,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 3584,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        zero_cond_t: bool = False,
        use_additional_t_cond: bool = False,
        use_layer3d_rope: bool = False,
        num_single_layers: int = 0,
        single_text_rank: int = 0,
    ):
        if not 0 <= num_single_layers <= num_layers:
            raise ValueError(f"num_single_layers={num_single_layers} not in [0, {num_layers}]")
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers - num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
            zero_cond_t=zero_cond_t,
            use_additional_t_cond=use_additional_t_cond,
            use_layer3d_rope=use_layer3d_rope,
        )
        # The parent's own @register_to_config recorded only its dual count.
        self.register_to_config(num_layers=num_layers)
        self.transformer_blocks.extend(
            AmberSingleStreamBlock(
                self.inner_dim, num_attention_heads, attention_head_dim, text_rank=single_text_rank
            )
            for _ in range(num_single_layers)
        )


# What a saved hybrid model folder calls this file: diffusers' `AutoModel` with
# `trust_remote_code=True` imports the class from it, where Amber is not installed. The file
# imports only torch and diffusers, so it travels as it is.
CODE_FILE = "amber_hybrid.py"


def bundle_code(folder: Path) -> None:
    """Make a folder written by `save_pretrained` loadable without Amber: this module beside
    `config.json`, and the `auto_map` entry that points `AutoModel` at it."""
    shutil.copyfile(__file__, folder / CODE_FILE)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    module = CODE_FILE.removesuffix(".py")
    config["auto_map"] = {"AutoModel": f"{module}.{AmberHybridTransformer2DModel.__name__}"}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
