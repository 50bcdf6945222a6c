"""One benchmark run: every arm for every seed, each judged model measured.

The teacher's targets for a fixed pool of training inputs are computed once and shared by
every arm and seed (`targets`), so the run's time goes to students. The arms of a seed run
in the given order and reuse the stages they share with earlier ones; a committed folder is
measured once, however many arms share it. Every model of a seed is measured on the same
suite (prompts, renderings, noise), so arms can be compared prompt by prompt.

A seed's results so far are rewritten to its folder after every arm (`PART`): a run cut
short keeps what it measured, and a run started again on the same folder goes on from there
(its committed stages are reused by `amber run`, its measurements read back).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from amber import commits, presets
from amber_trainer import models
from amber_trainer.quality import arms, measure, teacher

DATA_SAMPLES = 4096
DATA_SEED = 100  # the training pairs and the target pool are the same for every seed
PART = "part.json"  # one seed's results so far, in its folder


@dataclass(frozen=True)
class Size:
    """How many prompts a run measures (None: all) and how many entries the pool holds."""

    held_out: int | None = None
    training: int | None = None
    pool: int = 4096


QUICK = Size(held_out=138, training=48, pool=2048)


def figure(s: measure.Suite, teacher_model, outputs: dict, path: Path) -> None:
    """Real rendering, teacher, 10B-style and 6B-style on the same prompts and noise."""
    drawn = {"teacher": teacher_model}
    for stage in ("finetune", "fuse"):
        if stage in outputs:
            drawn[presets.MODEL_NAMES[stage]] = models.load(outputs[stage] / "model")
    measure.grid(s, drawn, path)


def _kept(folders: dict[str, Path]) -> list[int] | None:
    if "score" not in folders:
        return None
    return json.loads((folders["score"] / "importance.json").read_text())["keep"]


def _identity(folder: Path) -> str:
    """What a measurement is kept under: the committed folder and its commit marker's digest,
    so a stage committed again at the same place (after a code change) is measured again."""
    marker = hashlib.sha256((folder / commits.MARKER).read_bytes()).hexdigest()[:16]
    return f"{folder.resolve()}@{marker}"


def run(
    seeds: list[int],
    workdir: Path,
    arm_names: list[str],
    fixtures: Path,
    size: Size = Size(),
    budget: arms.Budget | None = None,
    grid: Path | None = None,
    log=print,
    jobs: int = 1,
) -> dict:
    """Run the arms for every seed; every measurement, per seed, arm and stage. With
    `jobs` > 1 the seeds run in that many processes, the cores shared out between them:
    the benchmark's small matrices keep one thread busy far better than two."""
    budget = budget or arms.Budget()
    teacher_model = teacher.load_teacher(fixtures)
    layers = len(teacher_model.transformer_blocks)  # the committed fixture's depth
    catalogue = arms.catalogue(budget, layers)
    unknown = sorted(set(arm_names) - set(catalogue))
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {', '.join(catalogue)}")
    started = time.perf_counter()
    data = arms.write_data(workdir / "data", DATA_SAMPLES, DATA_SEED, teacher_model, size.pool)
    log(f"training data and {size.pool} pooled teacher targets in {data}")
    results: dict = {
        "arms": {name: catalogue[name].description for name in arm_names},
        "budget": budget.__dict__,
        "poolSeconds": round(time.perf_counter() - started),
        "runs": [],
        "armSeconds": [],
    }
    work = [
        (seed, workdir / f"seed-{seed}", arm_names, fixtures, size, budget, data) for seed in seeds
    ]
    grids = [grid if i == 0 else None for i in range(len(seeds))]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if jobs <= 1:
        parts = [run_seed(*w, grid=g, log=log) for w, g in zip(work, grids, strict=True)]
    else:
        context = multiprocessing.get_context("spawn")  # no forked torch or process groups
        with ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_worker, initargs=(threads,)
        ) as pool:
            futures = [
                pool.submit(run_seed, *w, grid=g, log=None)
                for w, g in zip(work, grids, strict=True)
            ]
            parts = [f.result() for f in futures]
    for part in parts:
        results["runs"] += part["runs"]
        results["armSeconds"] += part["armSeconds"]
        results["prompts"], results["trainingPrompts"] = part["prompts"], part["trainingPrompts"]
    results["jobs"] = jobs
    results["threads"] = threads if jobs > 1 else torch.get_num_threads()
    return results


def _worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_seed(
    seed: int,
    workdir: Path,
    arm_names: list[str],
    fixtures: Path,
    size: Size,
    budget: arms.Budget,
    data: Path,
    grid: Path | None = None,
    log=None,
) -> dict:
    """Every arm for one seed, in order, each judged model measured on the seed's suites."""
    if log is None:

        def log(message: str) -> None:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    teacher_model = teacher.load_teacher(fixtures)
    judge = teacher.load_judge(fixtures)
    layers = len(teacher_model.transformer_blocks)
    catalogue = arms.catalogue(budget, layers)
    workdir.mkdir(parents=True, exist_ok=True)
    part = workdir / PART
    earlier = json.loads(part.read_text()) if part.exists() else {}
    if (earlier.get("size"), earlier.get("budget"), earlier.get("measurement")) != (
        size.__dict__,
        budget.__dict__,
        measure.MEASUREMENT,
    ):
        earlier = {}  # measured on another suite or budget, or otherwise: not comparable
    measured: dict[str, dict] = earlier.get("measured", {})  # committed folder -> measurement
    done = {a["arm"]: a for a in earlier.get("armSeconds", [])}
    out: dict = {"runs": [], "armSeconds": []}
    suites = measure.suites(teacher_model, seed, size.held_out, size.training)
    out["prompts"] = len(suites.held_out)
    out["trainingPrompts"] = len(suites.training)

    def save() -> None:
        state = {
            **out,
            "size": size.__dict__,
            "budget": budget.__dict__,
            "measurement": measure.MEASUREMENT,
            "measured": measured,
        }
        tmp = part.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(part)

    if "teacher" not in measured:
        measured["teacher"] = {
            **measure.evaluate(teacher_model, judge, suites),
            "parameters": models.count_parameters(teacher_model),
        }
    row = measured["teacher"]
    out["runs"].append({"arm": "teacher", "seed": seed, "stage": "teacher", **row})
    log(f"seed {seed} teacher: score {row['score']:.3f}")
    committed: dict = {}
    for name in arm_names:
        arm = catalogue[name]
        obj = arms.resource(
            arm,
            seed,
            layers,
            str(fixtures / teacher.TEACHER_DIR),
            str(data),
            str(workdir / "store"),
            budget,
        )
        clock = time.perf_counter()
        folders = arms.run_arm(obj, committed)
        trained = time.perf_counter() - clock
        judged = list(presets.MODEL_NAMES) if name == arms.PRESET else ["prune", arm.judged]
        for stage in dict.fromkeys(judged):
            if stage not in folders:
                continue
            # Every table row is measured in full; an arm's pruned model only for the
            # "after prune" column: its held-out score.
            full = name == arms.PRESET or stage == arm.judged
            key = _identity(folders[stage])
            if key not in measured or (full and not measured[key]["full"]):
                model = models.load(folders[stage] / "model")
                measured[key] = {
                    **measure.evaluate(model, judge, suites, full),
                    "parameters": models.count_parameters(model),
                }
            entry = {"arm": name, "seed": seed, "stage": stage, **measured[key]}
            out["runs"].append({**entry, "keep": _kept(folders)})
        if grid is not None and name == arms.PRESET:
            figure(suites.held_out, teacher_model, folders, grid)
        seconds = time.perf_counter() - clock
        if name in done:  # resumed: the time it took when it ran
            seconds = done[name]["seconds"]
        out["armSeconds"].append({"arm": name, "seed": seed, "seconds": round(seconds)})
        save()
        final = out["runs"][-1]
        log(
            f"seed {seed} {name}: {final['stage']} {final['score']:.3f} "
            f"(trained {trained:.0f} s, {seconds:.0f} s with measuring)"
        )
    return out
