"""Stage `encode`: image-text pairs -> safetensors shards of packed VAE latents and text
embeddings, made once with the teacher pipeline's own VAE and text encoder.

Every rank encodes every `world`-th source file (tar or parquet). A finished source's shards
are uploaded into the stage output with a small record written after them, so a restarted
encode skips the sources already done; rank 0 writes the stage's commit marker last,
listing every rank's shards. Shards hold `latents` (n, (res/16)², 4·z), `text` (n, maxTextTokens,
D), `text_mask` and `side`, the layout `data.load_shards` reads.
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from amber import commits
from amber.plan import OUTPUT
from amber.storage import open_store
from amber_trainer.data import encoders, pairs
from amber_trainer.runtime import Runtime
from amber_trainer.stages import Output, inputs

SOURCES = "sources"  # per-source completion records, inside the output folder


def run(rt: Runtime) -> Output:
    params = rt.run.stage
    spec = rt.run.data
    source = open_store(spec.uri, rt.run.storage.endpoint, rt.run.storage.region)
    files = pairs.sources(list(source.list()))
    if not files:
        raise FileNotFoundError(f"data.uri {spec.uri}: no .tar or .parquet files")
    mine = files[rt.rank :: rt.world]
    dtype = torch.bfloat16 if rt.device.type == "cuda" else torch.float32
    pipe = encoders.load(inputs.teacher_folder(rt), rt.device, dtype)
    started = time.perf_counter()
    rows = skipped = resumed = 0
    uploaded: dict[str, commits.FileEntry] = {}  # this rank's shards, in the output folder
    for done, name in enumerate(mine):
        record = finished_source(rt, name)
        if record is None:
            record = encode_source(rt, pipe, source, name, params)
        else:
            resumed += 1
        uploaded.update(
            {k: commits.FileEntry.model_validate(v) for k, v in record["files"].items()}
        )
        rows += record["pairs"]
        skipped += record["skipped"]
        rt.progress(done + 1, len(mine), phase="encode", pairs=rows)
    (rt.workdir / "output").mkdir()  # rank 0's commit adds no file of its own: all uploaded
    counts = rt.gather((rows, skipped, resumed, len(uploaded)))
    total = sum(c[0] for c in counts)
    if total == 0:
        raise ValueError(f"data.uri {spec.uri}: no readable image-text pairs")
    seconds = time.perf_counter() - started
    metrics = {
        "pairs": total,
        "skipped": sum(c[1] for c in counts),
        "sourcesResumed": sum(c[2] for c in counts),
        "shards": sum(c[3] for c in counts),
        "sources": len(files),
        "resolution": params.resolution,
        "pairs_per_s": round(total / max(seconds, 1e-9), 2),
    }
    return Output(total, metrics, uploaded)


def _record_key(rt: Runtime, name: str) -> str:
    return f"{rt.stage}/{OUTPUT}/{SOURCES}/{name.replace('/', '__')}.json"


def finished_source(rt: Runtime, name: str) -> dict | None:
    """The record of a source an earlier attempt of this spec finished: each source is its
    own small commit, so a restarted encode (any world size) skips what is done."""
    key = _record_key(rt, name)
    if not rt.store.exists(key):
        return None
    record = json.loads(rt.store.read_text(key))
    return record if record.get("specHash") == rt.run.spec_hash else None


def encode_source(rt: Runtime, pipe, source, name: str, params) -> dict:
    """Encode one tar or parquet file into shards, upload them, then record it as done."""
    local = rt.workdir / "pairs" / name
    source.download(name, local)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    stem = Path(name).stem.replace("/", "__")
    writer = ShardWriter(rt.workdir / "shards" / stem, stem, params.shard_size, params.resolution)
    skipped = 0
    batch: list[pairs.Pair] = []
    for pair in pairs.read(local, name):
        batch.append(pair)
        if len(batch) == params.batch_size:
            skipped += writer.add(encode_batch(pipe, batch, params, gen))
            batch = []
    if batch:
        skipped += writer.add(encode_batch(pipe, batch, params, gen))
    writer.flush()
    local.unlink()
    files = commits.upload_files(rt.store, f"{rt.stage}/{OUTPUT}", writer.folder)
    shutil.rmtree(writer.folder)
    record = {
        "specHash": rt.run.spec_hash,
        "pairs": writer.rows,
        "skipped": skipped,
        "files": {k: v.model_dump() for k, v in files.items()},
    }
    rt.store.write_text(_record_key(rt, name), json.dumps(record))  # after its shards
    return record


def encode_batch(pipe, batch: list[pairs.Pair], params, gen: torch.Generator):
    """(latents, text, mask, number of pairs whose image could not be decoded)."""
    images, captions, bad = [], [], 0
    for pair in batch:
        try:
            images.append(pairs.pixels(pair.image, params.resolution))
            captions.append(pair.caption)
        except OSError:  # PIL: not an image, or truncated
            bad += 1
    if not images:
        return None, bad
    latents = encoders.encode_images(pipe, torch.stack(images), gen)
    text, mask = encoders.encode_texts(pipe, captions, params.max_text_tokens)
    return (latents.cpu(), text.cpu(), mask.cpu()), bad


class ShardWriter:
    """Collects one source's encoded rows into shards of `size` rows, named after it."""

    def __init__(self, folder: Path, stem: str, size: int, resolution: int):
        self.folder, self.stem, self.size = folder, stem, size
        self.side = resolution // 16
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.rows = self.shards = 0
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, encoded) -> int:
        rows, bad = encoded
        if rows is not None:
            self.pending.append(rows)
            self.rows += rows[0].shape[0]
            while sum(p[0].shape[0] for p in self.pending) >= self.size:
                self._write(self.size)
        return bad

    def flush(self) -> None:
        if self.pending:
            self._write(sum(p[0].shape[0] for p in self.pending))

    def _write(self, n: int) -> None:
        latents, text, mask = (torch.cat(parts) for parts in zip(*self.pending, strict=True))
        rest = (latents[n:], text[n:], mask[n:])
        self.pending = [rest] if rest[0].shape[0] else []
        tensors = {
            "latents": latents[:n].contiguous(),
            "text": text[:n].contiguous(),
            "text_mask": mask[:n].contiguous(),
            "side": torch.tensor(self.side),
        }
        save_file(tensors, str(self.folder / f"{self.stem}-{self.shards:05d}.safetensors"))
        self.shards += 1
