"""Building, loading and measuring the transformers Amber works on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import QwenImageTransformer2DModel

from amber_trainer.model.hybrid import AmberHybridTransformer2DModel

# A 12-block teacher that runs in milliseconds on a CPU; the shapes keep Qwen-Image's ratios
# where they matter (packed 2x2 latents, RoPE axes summing to the head width).
TINY = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 12,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}

# diffusers' defaults are Qwen-Image: 60 blocks, 24 heads x 128, text width 3584.
NAMED_CONFIGS = {"qwen-image": {}, "tiny": TINY}


def named_config(name: str, **changes: Any) -> dict[str, Any]:
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(NAMED_CONFIGS)}")
    return {**NAMED_CONFIGS[name], **changes}


def model_class(config: dict[str, Any]) -> type[QwenImageTransformer2DModel]:
    if (
        config.get("num_single_layers")
        or config.get("_class_name") == "AmberHybridTransformer2DModel"
    ):
        return AmberHybridTransformer2DModel
    return QwenImageTransformer2DModel


def _init_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build(config: dict[str, Any], seed: int = 0) -> QwenImageTransformer2DModel:
    """A randomly initialised model from a config (tests and tiny recipes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).from_config(_init_kwargs(config))


def build_empty(config: dict[str, Any]) -> QwenImageTransformer2DModel:
    """A model on the meta device: shapes and parameter counts without memory."""
    with init_empty_weights():
        return model_class(config).from_config(_init_kwargs(config))


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> QwenImageTransformer2DModel:
    """A diffusers folder: the transformer itself, or a pipeline with transformer/."""
    path = Path(path)
    if (path / "transformer" / "config.json").exists():
        path = path / "transformer"
    config = QwenImageTransformer2DModel.load_config(path)
    return model_class(config).from_pretrained(path, torch_dtype=dtype)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def block_kinds(model: torch.nn.Module) -> list[str]:
    """'dual' or 'single' for each block, in order."""
    return [
        "single" if type(b).__name__ == "AmberSingleStreamBlock" else "dual"
        for b in model.transformer_blocks
    ]


def load_teacher(spec, workdir: Path, endpoint: str | None = None, region: str | None = None):
    """The teacher of a resource: built from its config, or read from its URI."""
    if spec.config is not None:
        return build(spec.config.given(), seed=spec.seed)
    from amber.storage import open_store

    uri = spec.uri
    if uri.startswith("s3://"):
        store = open_store(uri, endpoint=endpoint, region=region)
        local = workdir / "teacher"
        # A pipeline folder's transformer, else a bare model folder.
        if not (store.download_prefix("transformer", local) or store.download_prefix("", local)):
            raise FileNotFoundError(f"teacher {uri} is empty or does not exist")
        return load(local)
    path = Path(uri.removeprefix("file://"))
    if not (path / "config.json").exists() and not (path / "transformer" / "config.json").exists():
        raise FileNotFoundError(f"teacher {uri}: no diffusers model folder there")
    return load(path)
