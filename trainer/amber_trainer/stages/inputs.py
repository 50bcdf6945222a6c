"""What a stage runner starts from: the teacher, the model of the stage before it, the
training data and the teacher's precomputed targets."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from amber_trainer import data
from amber_trainer.data import encoders
from amber_trainer.model import models
from amber_trainer.runtime import Runtime
from amber_trainer.stages.outputs import LAYER_MAP, MODEL_DIR
from amber_trainer.train import speed, targets


def teacher(
    rt: Runtime, frozen: bool = True, device: torch.device | None = None
) -> torch.nn.Module:
    """The resource's teacher on `device` (default: this process's); frozen teachers never
    get gradients."""
    storage = rt.run.storage
    model = models.load_teacher(rt.run.teacher, rt.workdir, storage.endpoint, storage.region)
    if frozen:
        model.requires_grad_(False).eval()
        if rt.device.type == "cuda":
            model = model.to(torch.bfloat16)
        if speed.should_compile(rt.run.deepspeed, rt.device, zero_stage=0):  # never sharded
            speed.compile_blocks(model)
    return model.to(device or rt.device)


def input_model(rt: Runtime) -> tuple[torch.nn.Module, list[dict] | None]:
    """The model this stage starts from (the previous model stage's output) and its layer map."""
    if rt.run.model_from is None:
        return teacher(rt, frozen=False), None
    folder = rt.fetch_output(rt.run.model_from)
    layer_map = (
        json.loads((folder / LAYER_MAP).read_text()) if (folder / LAYER_MAP).exists() else None
    )
    return models.load(folder / MODEL_DIR).to(rt.device), layer_map


def teacher_folder(rt: Runtime, parts=encoders.PARTS) -> Path:
    """The teacher pipeline folder, local: a path as given, an S3 prefix downloaded (only
    the subfolders in `parts`)."""
    uri = rt.run.teacher.uri
    if uri is None:
        raise ValueError("teacher.uri: this stage needs the teacher pipeline folder")
    if not uri.startswith("s3://"):
        return Path(uri.removeprefix("file://"))
    from amber.storage import open_store

    store = open_store(uri, rt.run.storage.endpoint, rt.run.storage.region)
    local = rt.workdir / "teacher-pipeline"
    for part in parts:
        store.download_prefix(part, local)
    return local


def teacher_vae(rt: Runtime):
    """The teacher pipeline's VAE when the teacher is a pipeline folder with one (sample grids
    decode with it), else None; only its vae/ is fetched."""
    if rt.run.teacher.uri is None:
        return None
    folder = teacher_folder(rt, parts=("vae",))
    if not (folder / "vae").is_dir():
        return None
    dtype = torch.bfloat16 if rt.device.type == "cuda" else torch.float32
    return encoders.load_vae(folder, rt.device, dtype)


def datasets(rt: Runtime, config: dict) -> tuple[data.TensorDataset, data.TensorDataset]:
    """Training rows and held-out rows of the resource's data."""
    spec = rt.run.data
    if rt.run.data_from is not None:  # this run's encode stage
        folder = rt.fetch_output(rt.run.data_from)
        return data.load_shards(sorted(folder.glob("*.safetensors"))).split()
    if spec.synthetic is not None:
        s = spec.synthetic
        # Held-out rows are a separate draw: the training rows stay exactly `samples`.
        train = data.synthetic_dataset(config, s.samples, s.latent_size, s.text_tokens, s.seed)
        held = max(8, s.samples // 4)
        return train, data.synthetic_dataset(config, held, s.latent_size, s.text_tokens, s.seed + 1)
    if spec.shapes is not None:
        return data.shapes_datasets(config, spec.shapes.samples, spec.shapes.seed)
    if spec.cache_uri:
        from amber.storage import open_store

        store = open_store(spec.cache_uri, rt.run.storage.endpoint, rt.run.storage.region)
        shards = [
            k
            for k in store.list()
            if k.endswith(".safetensors") and not k.startswith(f"{targets.FOLDER}/")
        ]
        if not shards:
            raise FileNotFoundError(f"data.cacheUri {spec.cache_uri}: no .safetensors shards")
        local = []
        for key in shards:
            store.download(key, rt.workdir / "data" / key)
            local.append(rt.workdir / "data" / key)
        return data.load_shards(local).split()
    raise ValueError("data.uri needs an encode stage first: set data.cacheUri to its output")


def target_pool(
    rt: Runtime, teacher: torch.nn.Module, params, boundaries, train_rows: int
) -> targets.Pool | None:
    """The data's precomputed teacher targets for this stage's timestep distribution, when
    they exist (beside `data.cacheUri`'s shards) and were computed from this very teacher on
    these training rows."""
    if not rt.run.data.cache_uri or rt.run.data_from is not None:
        return None
    from amber.storage import open_store

    sampling = targets.sampling_of(params)
    store = open_store(rt.run.data.cache_uri, rt.run.storage.endpoint, rt.run.storage.region)
    key = f"{targets.FOLDER}/{sampling.key}/{targets.FILE}"
    if not store.exists(key):
        return None
    path = store.local_path(key)
    if path is None:
        path = rt.workdir / "data" / key
        store.download(key, path)
    pool = targets.load(path.parent.parent.parent, sampling, boundaries)
    if pool is None:
        rt.log("teacher targets lack hidden states; computing them live", pool=key)
        return None
    if pool.train_rows != train_rows:
        rt.log("teacher targets are for other training rows; computing them live", pool=key)
        return None
    if pool.teacher != targets.fingerprint(teacher):
        rt.log("teacher targets are from another teacher; computing them live", pool=key)
        return None
    rt.log("reading precomputed teacher targets", pool=key, entries=len(pool))
    return pool
