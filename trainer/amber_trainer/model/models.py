"""Building, loading and measuring the transformers Amber works on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import QwenImageTransformer2DModel

from amber.errors import InvalidInput, StorageError
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
    # diffusers' own keys (`_class_name`, ...) and the hybrid's `auto_map` (how a fresh
    # process finds its code) are not the model's arguments.
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "auto_map"}


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
    """A diffusers folder: the transformer itself, or a pipeline with transformer/. Its
    weights must be exactly those its config describes: diffusers would leave a missing
    block freshly initialised, or drop an extra one, and the run would go on with a model
    that is not the one in the folder."""
    path = Path(path)
    if (path / "transformer" / "config.json").exists():
        path = path / "transformer"
    config = QwenImageTransformer2DModel.load_config(path)
    check_weights(path, config)
    return model_class(config).from_pretrained(path, torch_dtype=dtype)


WEIGHTS = "diffusion_pytorch_model.safetensors"
SHOWN_KEYS = 4


def weight_keys(folder: Path) -> tuple[str, set[str]] | None:
    """The weight files' names (for messages) and the tensor names they hold, read from
    their headers alone; None when the folder has no safetensors weights."""
    from safetensors import safe_open

    index = folder / f"{WEIGHTS}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / WEIGHTS).is_file():
        shards = [WEIGHTS]
    else:
        return None
    keys: set[str] = set()
    for shard in shards:
        try:
            with safe_open(str(folder / shard), "pt") as f:
                keys.update(f.keys())
        except Exception as err:  # a truncated or foreign file: safetensors' own words
            message = f"{folder / shard}: not a readable safetensors file ({err})"
            raise InvalidInput(message) from None
    return ", ".join(str(folder / s) for s in shards), keys


def check_weights(folder: Path, config: dict[str, Any]) -> None:
    """InvalidInput naming the files and the keys when the weights in `folder` are not
    exactly the parameters `config` builds."""
    found = weight_keys(folder)
    if found is None:
        return
    files, keys = found
    wanted = set(build_empty(dict(config)).state_dict())
    missing, unexpected = sorted(wanted - keys), sorted(keys - wanted)
    if not missing and not unexpected:
        return
    problems = [
        f"{len(names)} {what} ({', '.join(names[:SHOWN_KEYS])}"
        + (", ..." if len(names) > SHOWN_KEYS else "")
        + ")"
        for what, names in (("missing", missing), ("unexpected", unexpected))
        if names
    ]
    raise InvalidInput(
        f"{files}: the weights do not match {folder / 'config.json'} "
        f"(num_layers {config.get('num_layers')}): {'; '.join(problems)}"
    )


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
            raise StorageError(f"teacher {uri} is empty or does not exist")
        return load(local)
    path = Path(uri.removeprefix("file://"))
    if not (path / "config.json").exists() and not (path / "transformer" / "config.json").exists():
        raise InvalidInput(f"teacher {uri}: no diffusers model folder there ({path.absolute()})")
    return load(path)
