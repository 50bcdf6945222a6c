"""The encode stage: real image-text pairs (WebDataset tars and parquet) through a complete,
randomly initialised teacher pipeline (VAE, Qwen2.5-VL text encoder, tokenizer) into
committed shards, then training and an eval sample grid from them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import zlib

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from amber import commits
from amber.plan import plan
from amber.resource import InvalidResource, parse
from amber.storage import open_store
from amber_trainer import data
from amber_trainer.data import encoders, pairs
from trainer_helpers import ROOT, finish, torchrun, trainer_env

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
SHAPES = ("circle", "square")


def picture(color: str, shape: str, size=(80, 64)) -> bytes:
    img = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(img)
    box = (20, 12, 60, 52)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """2 tars (5 complete pairs each; one corrupt image, one image without caption) and a
    parquet file with 4 pairs: 13 encodable pairs in 3 sources."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("pairs")
    combos = [(c, s) for c in COLORS for s in SHAPES]
    for shard in range(2):
        with tarfile.open(folder / f"train-{shard:05d}.tar", "w") as tar:
            for i in range(5):
                color, shape = combos[(shard * 5 + i) % len(combos)]
                key = f"{shard:02d}{i:03d}"
                image = b"not a png" if (shard, i) == (1, 2) else picture(color, shape)
                add(tar, f"{key}.png", image)
                if i % 2:
                    add(tar, f"{key}.json", json.dumps({"caption": f"a {color} {shape}"}).encode())
                else:
                    add(tar, f"{key}.txt", f"a {color} {shape}".encode())
            add(tar, "orphan.png", picture("red", "circle"))  # no caption: not a pair
    table = pa.table(
        {
            "image": [{"bytes": picture(c, s), "path": None} for c, s in combos[:4]],
            "caption": [f"a {c} {s} on the left" for c, s in combos[:4]],
        }
    )
    pq.write_table(table, folder / "extra.parquet")
    (folder / "README.txt").write_text("not a source")
    return folder


@pytest.fixture(scope="module")
def teacher_pipeline(tmp_path_factory):
    return encoders.tiny_pipeline(tmp_path_factory.mktemp("teacher") / "pipeline")


STAGES = [
    {"type": "encode", "resolution": 64, "batchSize": 3, "shardSize": 4, "maxTextTokens": 16},
    {"type": "score", "targetLayers": 6, "calibrationSamples": 4, "timesteps": [0.5]},
    {"type": "prune"},
    {"type": "distill", "steps": 4, "microBatchSize": 4, "checkpointEvery": 2},
    {"type": "eval", "samples": 4, "timestepBuckets": 2, "sampleSteps": 2},
]


def resource(teacher, pairs_uri, store, stages=None, **extra) -> dict:
    return {
        "apiVersion": "amber.dev/v1alpha1",
        "kind": "AmberCompression",
        "metadata": {"name": "encoded"},
        "spec": {
            "teacher": {"uri": str(teacher), "numLayers": 12},
            "data": {"uri": str(pairs_uri), **extra},
            "storage": {"uri": store},
            "resources": {"pods": 1, "gpusPerPod": 0},
            "deepspeed": {"precision": "fp32", "activationCheckpointing": False},
            "stages": stages or STAGES,
        },
    }


def test_pairs_reads_webdataset_tars_and_parquet(dataset):
    names = pairs.sources([p.name for p in dataset.iterdir()])
    assert names == ["extra.parquet", "train-00000.tar", "train-00001.tar"]
    found = [p for n in names for p in pairs.read(dataset / n, n)]
    assert len(found) == 14  # the orphan image has no caption
    assert found[0].caption == "a red circle on the left"
    assert {p.key for p in found} >= {"train-00000.tar/00001", "extra.parquet/3"}
    pixels = pairs.pixels(found[0].image, 32)
    assert pixels.shape == (3, 32, 32) and -1 <= pixels.min() < pixels.max() <= 1
    with pytest.raises(OSError):
        pairs.pixels(b"not a png", 32)


def test_resource_rules_for_raw_data(teacher_pipeline, dataset):
    doc = resource(teacher_pipeline, dataset, "/tmp/unused")
    assert [r.data_from for r in plan(parse(doc))] == [None, *["encode"] * 4]
    bad = resource(teacher_pipeline, dataset, "/tmp/unused", cacheUri="s3://b/enc")
    with pytest.raises(InvalidResource, match=r"data\.cacheUri"):
        parse(bad)
    no_encode = resource(teacher_pipeline, dataset, "/tmp/unused")
    no_encode["spec"]["stages"] = no_encode["spec"]["stages"][1:]
    with pytest.raises(InvalidResource, match=r"data\.uri: raw pairs need an encode stage"):
        parse(no_encode)
    preset = resource(teacher_pipeline, dataset, "/tmp/unused")
    del preset["spec"]["stages"]
    preset["spec"]["preset"] = "amber-10b"
    assert parse(preset).spec.pipeline()[0].type == "encode"
    configured = resource(teacher_pipeline, dataset, "/tmp/unused")
    configured["spec"]["teacher"] = {"config": {"num_layers": 12}}
    with pytest.raises(InvalidResource, match=r"teacher\.uri"):
        parse(configured)


@pytest.mark.slow
def test_two_ranks_encode_into_committed_shards_on_s3(teacher_pipeline, dataset, bucket, tmp_path):
    doc = resource(teacher_pipeline, dataset, f"s3://{bucket}/runs")
    run = plan(parse(doc))[0]
    code, out, _ = finish(torchrun(run, tmp_path, nproc=2))
    assert code == 0, out[-3000:]
    store = open_store(run.run_uri)
    manifest = commits.read_manifest(store, "encode/output")
    assert manifest is not None and manifest.spec_hash == run.spec_hash
    # every rank's shards are listed: rank 0 had extra.parquet and train-00001.tar
    assert sorted(manifest.files) == [
        "extra-00000.safetensors",
        "train-00000-00000.safetensors",
        "train-00000-00001.safetensors",
        "train-00001-00000.safetensors",
    ]
    assert manifest.metrics["pairs"] == 13 and manifest.metrics["skipped"] == 1

    local = commits.fetch(store, manifest, tmp_path / "shards")
    encoded = data.load_shards(sorted(local.glob("*.safetensors")))
    assert len(encoded) == 13 and encoded.side == 4
    assert encoded.latents.shape == (13, 16, 16)  # (64/16)² tokens x 4·z channels
    assert encoded.text.shape == (13, 16, 32) and encoded.text_mask.sum(1).min() > 0

    # Row 0 of rank 0's first shard is the first pair of the first source, encoded the same
    # way in this process: the data path is the pipeline's own, seeded per source.
    pipe = encoders.load(teacher_pipeline, torch.device("cpu"), torch.float32)
    first = next(pairs.read(dataset / "extra.parquet", "extra.parquet"))
    gen = torch.Generator().manual_seed(zlib.crc32(b"extra.parquet"))
    latents = encoders.encode_images(pipe, pairs.pixels(first.image, 64)[None], gen)
    text, _ = encoders.encode_texts(pipe, [first.caption], 16)
    shard0 = data.load_shards([local / "extra-00000.safetensors"])
    torch.testing.assert_close(shard0.latents[0], latents[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shard0.text[0], text[0], atol=1e-5, rtol=1e-4)

    again = finish(torchrun(run, tmp_path, nproc=2))
    assert again[0] == 0 and any(e.get("reused") for e in again[2])

    # Killed after every source was done but before the commit: a restart (with another
    # world size) re-encodes nothing and commits the same shards.
    store.delete("encode/output/COMMIT.json")
    code, out, _ = finish(torchrun(run, tmp_path, nproc=1))
    assert code == 0, out[-3000:]
    resumed = commits.read_manifest(store, "encode/output")
    assert resumed.metrics["sourcesResumed"] == 3 and resumed.files == manifest.files


@pytest.mark.slow
def test_amber_run_encodes_trains_and_draws_a_sample_grid(teacher_pipeline, dataset, tmp_path):
    store = tmp_path / "store"
    path = tmp_path / "encoded.yaml"
    path.write_text(yaml.safe_dump(resource(teacher_pipeline, dataset, str(store))))
    done = subprocess.run(
        [sys.executable, "-m", "amber", "run", str(path), "--nproc", "1", "-o", "json"],
        capture_output=True, text=True, env=trainer_env(), timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_store = open_store(str(store / "default" / "encoded"))
    manifest = commits.read_manifest(run_store, "eval/output")
    assert manifest.metrics["sampleGrid"] == "samples.png" and "samples.png" in manifest.files
    grid = Image.open(commits.fetch(run_store, manifest, tmp_path / "eval") / "samples.png")
    assert grid.size[0] == 3 * 64  # data, teacher, student
    distill = commits.read_manifest(run_store, "distill/output")
    assert distill is not None and len(distill.metrics["loss"]) == 4
