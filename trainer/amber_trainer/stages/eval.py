"""Stage `eval`: how far the compressed model's velocity is from the teacher's, per timestep;
on the shapes task with its judge, also what every model of the run draws."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from amber_trainer.data import encoders
from amber_trainer.model import errors, models
from amber_trainer.model.generate import euler
from amber_trainer.runtime import Runtime
from amber_trainer.stages import Output, inputs, outputs


@torch.no_grad()
def run(rt: Runtime) -> Output:
    params = rt.run.stage
    teacher = inputs.teacher(rt)
    student, _ = inputs.input_model(rt)
    student.eval().to(teacher.dtype)
    _, held_out = inputs.datasets(rt, dict(teacher.config))
    count = min(params.samples, len(held_out))
    buckets = params.timestep_buckets
    gen = torch.Generator().manual_seed(params.seed)
    rows = list(range(count))
    mine = [rows[i : i + params.batch_size] for i in range(0, count, params.batch_size)]
    mine = mine[rt.rank :: rt.world]
    batches = (held_out.rows(chunk, rt.device, teacher.dtype) for chunk in mine)
    sums = errors.velocity_errors(
        teacher, student, batches, buckets, gen, on_batch=lambda i: rt.progress(i, len(mine))
    )
    totals = rt.gather(sums)
    rel, fm_student, fm_teacher = (sum(t[i] for t in totals) / max(count, 1) for i in range(3))
    edges = [(b / buckets, (b + 1) / buckets) for b in range(buckets)]
    metrics = {
        "samples": count,
        "buckets": [list(e) for e in edges],
        "relativeVelocityError": rel.tolist(),
        "flowLossStudent": fm_student.tolist(),
        "flowLossTeacher": fm_teacher.tolist(),
        "meanRelativeVelocityError": float(rel.mean()),
        "studentParameters": models.count_parameters(student),
        "teacherParameters": models.count_parameters(teacher),
    }
    out = rt.workdir / "output"
    out.mkdir()
    if rt.is_main:
        _plot(metrics, out / "velocity_error.png")
        vae = inputs.teacher_vae(rt)
        if vae is not None:  # a teacher pipeline with a VAE: pictures, not only numbers
            sample_grid(vae, teacher, student, held_out, params, out / "samples.png")
            metrics["sampleGrid"] = "samples.png"
        shapes = rt.run.data.shapes
        if shapes is not None and shapes.judge_uri is not None:
            models_ = {"teacher": teacher.float().cpu()}
            for name in rt.run.models_before:
                if name == rt.run.model_from:
                    models_[name] = student
                else:
                    models_[name] = models.load(rt.fetch_output(name) / outputs.MODEL_DIR)
            judge = fetch_judge(rt, shapes.judge_uri)
            metrics["judged"] = judged(judge, models_, out, params.seed)
        (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    summary = ("meanRelativeVelocityError", "samples", "sampleGrid", "judged")
    return Output(0, {k: metrics[k] for k in summary if k in metrics})


def fetch_judge(rt: Runtime, uri: str):
    """The shapes task's judge from its folder (any store), checked against its SHA256SUMS."""
    from amber.storage import open_store
    from amber_trainer.quality import fixtures

    store = open_store(uri, rt.run.storage.endpoint, rt.run.storage.region)
    local = rt.workdir / "judge"
    for key in (fixtures.JUDGE_FILE, fixtures.SUMS):
        if not store.exists(key):
            raise FileNotFoundError(f"data.shapes.judgeUri {uri}: no {key}")
        store.download(key, local / key)
    return fixtures.load_judge(local)


@torch.no_grad()
def judged(judge, models_: dict[str, torch.nn.Module], out: Path, seed: int = 0) -> dict:
    """Every held-out combination of the shapes task drawn once by each model (teacher
    first) from the same noise, with the benchmark's sampler, and read by the judge: per
    model, the share of prompts drawn with every attribute right, per-attribute accuracy and
    parameters. A grid of a few prompts, real rendering first, goes to `out`. `seed` picks
    the renderings and the noise."""
    from amber.presets import MODEL_NAMES
    from amber.report import JUDGED_GRID
    from amber_trainer.quality import judge as judging
    from amber_trainer.quality import measure

    suite = measure.suite(per_combination=1, seed=seed)
    table = {}
    for name, model in models_.items():
        images = measure.generate(model.float().cpu(), suite)
        grade = judging.grade(judge, images, suite.scenes)
        table[name] = {
            "prompts": len(suite),
            "score": grade["score"],
            "attributes": grade["attributes"],
            "parameters": models.count_parameters(model),
        }
    drawn = {MODEL_NAMES.get(name, name): model for name, model in models_.items()}
    measure.grid(suite, drawn, out / JUDGED_GRID)
    return table


def sample_grid(vae, teacher, student, held_out, params, path: Path, rows: int = 4) -> None:
    """Held-out captions, one row each: the data's own image, then teacher and student
    samples from the same noise, decoded with the teacher pipeline's VAE."""
    from PIL import Image

    n = min(rows, len(held_out))
    batch = held_out.rows(list(range(n)), teacher.device, teacher.dtype)
    gen = torch.Generator().manual_seed(params.seed)
    noise = torch.randn(batch.latents.shape, generator=gen).to(batch.latents)
    columns = [
        batch.latents,
        euler(teacher, batch, noise, params.sample_steps),
        euler(student, batch, noise, params.sample_steps),
    ]
    images = [encoders.decode(vae, c, held_out.side) for c in columns]  # (n, 3, px, px)
    px = images[0].shape[-1]
    grid = Image.new("RGB", (px * len(images), px * n))
    for j, column in enumerate(images):
        for i in range(n):
            array = (column[i].permute(1, 2, 0).cpu().numpy() * 255).astype("uint8")
            grid.paste(Image.fromarray(array), (j * px, i * px))
    grid.save(path)


def _plot(metrics: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centers = [(a + b) / 2 for a, b in metrics["buckets"]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(centers, metrics["relativeVelocityError"], marker="o")
    ax.set_xlabel("timestep t (bucket centre)")
    ax.set_ylabel("||v_student - v_teacher|| / ||v_teacher||")
    ax.set_title("student vs teacher velocity, held-out data")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
