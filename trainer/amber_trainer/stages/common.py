"""Helpers the stage runners share: their inputs (model, data) and their outputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from amber_trainer import data
from amber_trainer.data import encoders
from amber_trainer.model import hybrid, models
from amber_trainer.runtime import Runtime
from amber_trainer.train import loop, speed, targets

MODEL_DIR = "model"
LAYER_MAP = "layer_map.json"


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


def trained_model(engine, state: dict | None = None) -> torch.nn.Module:
    """The engine's student as a plain model, with the loop `state`'s moving average of its
    weights when it keeps one. Under ZeRO-3 each rank holds only a shard of every large
    weight, so they are gathered (collectively: every rank must call this) into a fresh
    copy; otherwise the student itself is returned."""
    student = engine.module.student
    if state is not None and "ema" in state:
        return loop.load_ema(student, state["ema"])
    if not engine.zero_optimization_partition_weights():
        return student
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
        state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    config = {k: v for k, v in student.config.items() if not k.startswith("_")}
    copy = models.build_empty(config)
    copy.load_state_dict(state, assign=True, strict=True)
    return copy


def save_model(model: torch.nn.Module, out: Path, layer_map: list[dict] | None) -> None:
    model.save_pretrained(out / MODEL_DIR, safe_serialization=True)
    if isinstance(model, hybrid.AmberHybridTransformer2DModel):
        hybrid.bundle_code(out / MODEL_DIR)
    if layer_map is not None:
        (out / LAYER_MAP).write_text(json.dumps(layer_map, indent=2))


def training_metrics(state: dict) -> dict:
    """What every optimising stage reports from its loop state."""
    return {
        "loss": state["losses"],
        "firstLoss": state["losses"][0],
        "finalLoss": state["losses"][-1],
        "samplesPerSecond": state["samples_per_s"],
        "peakMemoryMB": state["peak_memory_mb"],
    }


def write_output(
    rt: Runtime, model, layer_map: list[dict] | None, metrics: dict, title: str
) -> Path:
    """A model stage's output folder: model, layer map, loss curve, metrics (rank 0 writes)."""
    out = rt.workdir / "output"
    out.mkdir()
    if rt.is_main:
        save_model(model, out, layer_map)
        if metrics.get("loss"):
            loss_curve(metrics["loss"], out / "loss.png", f"{rt.stage}: {title}")
        (out / "metrics.json").write_text(json.dumps(metrics))
    return out


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
        for key in store.list(part):
            store.download(key, local / key)
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


def loss_curve(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
