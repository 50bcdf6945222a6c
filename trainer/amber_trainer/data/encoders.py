"""The teacher pipeline's VAE and text encoder: pixels -> packed latents, captions -> text
embeddings, and back from latents to pixels for sample grids.

Encoding goes through `QwenImagePipeline` itself (its prompt template, its latent
normalisation and 2x2 packing), so cached data matches what generation feeds the
transformer. `tiny_pipeline` writes a complete, randomly initialised pipeline folder
(tokenizer included) for tests and examples: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

from amber_trainer.model import models

PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def load(folder: Path, device: torch.device, dtype: torch.dtype) -> QwenImagePipeline:
    """VAE, text encoder and tokenizer of a diffusers pipeline folder (no transformer)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    missing = [p for p in ("vae", "text_encoder", "tokenizer") if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"teacher pipeline {folder} has no {', '.join(missing)}/")
    vae = AutoencoderKLQwenImage.from_pretrained(folder / "vae", torch_dtype=dtype)
    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        folder / "text_encoder", torch_dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval().requires_grad_(False),
        text_encoder=text_encoder.eval().requires_grad_(False),
        tokenizer=tokenizer,
        transformer=None,
    )
    return pipe.to(device)


def load_vae(folder: Path, device: torch.device, dtype: torch.dtype) -> AutoencoderKLQwenImage:
    """The pipeline folder's VAE alone (sample grids decode; nothing to encode text)."""
    vae = AutoencoderKLQwenImage.from_pretrained(Path(folder) / "vae", torch_dtype=dtype)
    return vae.eval().requires_grad_(False).to(device)


def _normalisation(vae, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents)
    return mean, std


@torch.no_grad()
def encode_images(pipe: QwenImagePipeline, pixels: torch.Tensor, gen: torch.Generator):
    """(B, 3, H, W) in [-1, 1] -> packed, normalised latents (B, H/16 * W/16, 4·z)."""
    vae = pipe.vae
    x = pixels.to(vae.device, vae.dtype)[:, :, None]  # the VAE is a video VAE: one frame
    posterior = vae.encode(x).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=gen).to(posterior.mean)
    latents = posterior.mean + posterior.std * noise  # a seeded sample of the posterior
    mean, std = _normalisation(vae, latents)
    latents = (latents - mean) / std
    b, c, _, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents[:, :, 0], b, c, h, w)


@torch.no_grad()
def encode_texts(pipe: QwenImagePipeline, captions: list[str], max_tokens: int):
    """Captions -> (embeddings (B, T, D), mask (B, T)) with T = max_tokens (zero padded)."""
    embeds, mask = pipe.encode_prompt(
        captions, device=pipe.text_encoder.device, max_sequence_length=max_tokens
    )
    embeds = embeds[:, :max_tokens]
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    mask = mask[:, :max_tokens].long()
    pad = max_tokens - embeds.shape[1]
    if pad > 0:
        embeds = torch.nn.functional.pad(embeds, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
    return embeds * mask[..., None].to(embeds.dtype), mask


@torch.no_grad()
def decode(vae, latents: torch.Tensor, side: int) -> torch.Tensor:
    """Packed latents (B, side², 4·z) -> images (B, 3, 8·2·side, 8·2·side) in [0, 1]."""
    b = latents.shape[0]
    px = side * 2 * 8
    x = QwenImagePipeline._unpack_latents(latents.to(vae.device, vae.dtype), px, px, 8)
    mean, std = _normalisation(vae, x)
    images = vae.decode(x * std + mean, return_dict=False)[0][:, :, 0]
    return ((images.float() + 1) / 2).clamp(0, 1).reshape(b, 3, px, px)


def tiny_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained on `texts`, with the Qwen chat special tokens."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def tiny_pipeline(folder: Path, transformer_config: dict | None = None, seed: int = 0) -> Path:
    """Write a randomly initialised QwenImage pipeline folder whose parts fit together:
    z = in_channels / 4, text width = joint_attention_dim."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    config = transformer_config or models.TINY
    z, width = config["in_channels"] // 4, config["joint_attention_dim"]
    torch.manual_seed(seed)
    template = (
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
        "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
        "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    )
    words = "a an the red green blue yellow circle square triangle on left right of above below"
    tokenizer = tiny_tokenizer([template, words, words.title()])
    heads = 2
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        # M-RoPE's three sections cover half the head width
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _thirds(width // heads // 2),
        },
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": width,
        "fullatt_block_indexes": [0],
    }
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config)
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        latents_mean=[0.0] * z,
        latents_std=[1.0] * z,
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=models.build(config, seed=seed),
    )
    pipe.save_pretrained(folder)
    return folder


def _thirds(n: int) -> list[int]:
    first = n - 2 * (n // 3)
    return [first, n // 3, n // 3]
