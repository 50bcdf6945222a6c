"""Image-text pairs as users keep them: WebDataset tar shards (`key.jpg` + `key.txt`, or a
`key.json` with a caption) or parquet files (an image column of bytes and a caption column),
under a local folder or an S3 prefix."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_KEYS = ("caption", "text", "prompt", "txt")
SOURCE_EXTENSIONS = (".tar", ".parquet")


@dataclass(frozen=True)
class Pair:
    key: str  # unique within the dataset: source file + sample key
    image: bytes
    caption: str


def sources(keys: list[str]) -> list[str]:
    """The readable files among a listing, in a fixed order."""
    return sorted(k for k in keys if k.endswith(SOURCE_EXTENSIONS))


def read(path: Path, name: str) -> Iterator[Pair]:
    """The pairs in one local tar or parquet file; `name` prefixes their keys."""
    if name.endswith(".tar"):
        yield from _tar(path, name)
    elif name.endswith(".parquet"):
        yield from _parquet(path, name)
    else:
        raise ValueError(f"{name}: not a .tar or .parquet file")


def _caption_of(member: str, data: bytes) -> str | None:
    if member.endswith((".txt", ".caption")):
        return data.decode("utf-8").strip()
    if member.endswith(".json"):
        meta = json.loads(data)
        return next((str(meta[k]).strip() for k in CAPTION_KEYS if k in meta), None)
    return None


def _tar(path: Path, name: str) -> Iterator[Pair]:
    # WebDataset groups a sample's files by the key before the first dot, in order.
    images: dict[str, bytes] = {}
    captions: dict[str, str] = {}
    order: list[str] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            data = tar.extractfile(member).read()
            if key not in images and key not in captions:
                order.append(key)
            if ("." + ext).lower() in IMAGE_EXTENSIONS:
                images[key] = data
            else:
                caption = _caption_of(base, data)
                if caption is not None:
                    captions[key] = caption
    for key in order:
        if key in images and key in captions:  # incomplete samples are skipped
            yield Pair(f"{name}/{key}", images[key], captions[key])


def _parquet(path: Path, name: str) -> Iterator[Pair]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = set(table.column_names)
    image_col = next((c for c in ("image", "jpg", "png", "image_bytes") if c in columns), None)
    caption_col = next((c for c in CAPTION_KEYS if c in columns), None)
    if image_col is None or caption_col is None:
        raise ValueError(
            f"{name}: needs an image column (image, jpg, png, image_bytes) and a caption "
            f"column ({', '.join(CAPTION_KEYS)}); it has {', '.join(sorted(columns))}"
        )
    for i, (image, caption) in enumerate(
        zip(table[image_col].to_pylist(), table[caption_col].to_pylist(), strict=True)
    ):
        if isinstance(image, dict):  # the Hugging Face datasets layout: {"bytes", "path"}
            image = image.get("bytes")
        if image and caption:
            yield Pair(f"{name}/{i}", image, str(caption).strip())


def pixels(image: bytes, resolution: int):
    """Decoded, RGB, shorter side resized to `resolution`, centre-cropped square, in [-1, 1]:
    (3, resolution, resolution)."""
    import numpy as np
    import torch
    from PIL import Image

    img = Image.open(io.BytesIO(image)).convert("RGB")
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
