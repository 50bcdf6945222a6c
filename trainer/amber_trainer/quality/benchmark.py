"""One benchmark run: every arm for every seed, each judged model measured.

The teacher's targets for a fixed pool of training inputs are computed once and shared by
every arm and seed (`targets`), so the run's time goes to students. Each (seed, arm) is a
task; tasks run in worker processes, one per core, as soon as the arms of the same seed
whose stages they share have run (an arm copies those committed stages and `amber run`
reuses them). A committed model is measured once, however many arms share it. Every model
of a seed is measured on the same suite (prompts, renderings, noise), so arms can be
compared prompt by prompt.

Everything a task produces is kept in its seed's folder as it goes (committed stages,
`measured/`, `arms/`): a run cut short keeps what it measured, and a run started again on
the same folder goes on from there.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from amber import commits, presets
from amber_trainer.model import models
from amber_trainer.quality import arms, fixtures, measure

DATA_SAMPLES = 4096
DATA_SEED = 100  # the training pairs and the target pool are the same for every seed
MEASURED = "measured"  # per seed: one file per measured model, by commit marker digest
ARMS = "arms"  # per seed: one file per arm that has run (how long it took)


@dataclass(frozen=True)
class Size:
    """How many prompts a run measures (None: all), how many entries the pool holds, and
    on how many held-out prompts an arm's model right after pruning is scored (spread over
    the held-out suite; its score there is a column, never compared prompt by prompt)."""

    held_out: int | None = None
    training: int | None = None
    pool: int = 4096
    pruned: int = measure.ERROR_SCENES


QUICK = Size(held_out=138, training=48, pool=2048)


@dataclass(frozen=True)
class Task:
    """One arm for one seed; `after`: the arms of its seed whose stages it reuses, which
    run first; `teacher`: it also measures the teacher (the seed's first task)."""

    seed: int
    arm: str
    after: tuple[str, ...] = ()
    teacher: bool = False


def schedule(
    seeds: list[int], arm_names: list[str], hashes, limits: dict[str, int | None] | None = None
) -> list[Task]:
    """Tasks in the order they are started: arm by arm, every seed's in turn, so that the
    arms others reuse are done early. `hashes(seed, arm)` is the set of an arm's stage spec
    hashes; an arm waits for every earlier arm of its seed it shares one with. `limits`: how
    many of the seeds (the first ones) an arm runs on, where not all."""
    limits = limits or {}
    tasks: list[Task] = []
    for name in arm_names:
        for seed in seeds[: limits.get(name)]:
            mine = hashes(seed, name)
            earlier = [t.arm for t in tasks if t.seed == seed]
            after = tuple(a for a in earlier if mine & hashes(seed, a))
            tasks.append(Task(seed, name, after, teacher=not earlier))
    return tasks


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
    """What a measurement is kept under: its commit marker's digest. Copies of a committed
    output (arms sharing a stage) are one model; a stage committed again (after a code
    change) is a new one."""
    return hashlib.sha256((folder / commits.MARKER).read_bytes()).hexdigest()[:16]


def run(
    seeds: list[int],
    workdir: Path,
    arm_names: list[str],
    fixture_dir: Path,
    size: Size = Size(),
    budget: arms.Budget | None = None,
    grid: Path | None = None,
    log=print,
    jobs: int = 1,
) -> dict:
    """Run the arms for every seed; every measurement, per seed, arm and stage. With
    `jobs` > 1 the tasks run in that many processes, the cores shared out between them:
    the benchmark's small matrices keep one thread busy far better than two."""
    budget = budget or arms.Budget()
    teacher_model = fixtures.load_teacher(fixture_dir)
    layers = len(teacher_model.transformer_blocks)  # the committed fixture's depth
    catalogue = arms.catalogue(budget, layers)
    unknown = sorted(set(arm_names) - set(catalogue))
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {', '.join(catalogue)}")
    started = time.perf_counter()
    data = arms.write_data(workdir / "data", DATA_SAMPLES, DATA_SEED, teacher_model, size.pool)
    log(f"training data and {size.pool} pooled teacher targets in {data}")
    del teacher_model
    results: dict = {
        "arms": {name: catalogue[name].description for name in arm_names},
        "budget": budget.__dict__,
        "poolSeconds": round(time.perf_counter() - started),
        "runs": [],
        "armSeconds": [],
    }

    @functools.cache
    def hashes(seed: int, name: str) -> set[str]:
        store = str(workdir / f"seed-{seed}" / "store")
        obj = arms.resource(catalogue[name], seed, layers, "teacher", str(data), store, budget)
        return arms.spec_hashes(obj)

    tasks = schedule(seeds, arm_names, hashes, {n: catalogue[n].seeds for n in arm_names})
    common = (workdir, fixture_dir, size, budget, data)

    def args(task: Task) -> tuple:
        first = task.seed == seeds[0] and task.arm == arms.PRESET
        return (task, *common, grid if first else None)

    outputs: dict[Task, dict] = {}
    jobs = max(1, min(jobs, len(tasks)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1:
        for task in tasks:
            outputs[task] = run_task(*args(task), log=log)
    else:
        context = multiprocessing.get_context("spawn")  # no forked torch or process groups
        with ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_worker, initargs=(threads,)
        ) as pool:
            waiting, running = list(tasks), {}
            while waiting or running:
                done = {(t.seed, t.arm) for t in outputs}
                for task in [t for t in waiting if all((t.seed, a) in done for a in t.after)]:
                    if len(running) == jobs:
                        break
                    waiting.remove(task)
                    running[pool.submit(run_task, *args(task))] = task
                if not running:
                    raise RuntimeError(f"tasks that can never start: {waiting}")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    outputs[running.pop(future)] = future.result()
    for seed in seeds:  # in catalogue order, whatever order they ran in
        for task in (t for t in tasks if t.seed == seed):
            results["runs"] += outputs[task]["runs"]
            results["armSeconds"].append(outputs[task]["armSeconds"])
            results["prompts"] = outputs[task]["prompts"]
            results["trainingPrompts"] = outputs[task]["trainingPrompts"]
    results["jobs"] = jobs
    results["threads"] = threads if jobs > 1 else torch.get_num_threads()
    return results


def _worker(threads: int) -> None:
    torch.set_num_threads(threads)


_CONTEXT: dict = {}  # per process: (fixture_dir, seed, size) -> teacher, judge, suites


def _context(fixture_dir: Path, seed: int, size: Size):
    key = (str(fixture_dir), seed, size)
    if key not in _CONTEXT:
        teacher_model = fixtures.load_teacher(fixture_dir)
        suites = measure.suites(teacher_model, seed, size.held_out, size.training)
        _CONTEXT[key] = teacher_model, fixtures.load_judge(fixture_dir), suites
    return _CONTEXT[key]


def _saved(path: Path, size: Size) -> dict | None:
    """A file this run may use: written for the same suite and the same measurement."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    same = (saved.get("size"), saved.get("measurement")) == (size.__dict__, measure.MEASUREMENT)
    return saved if same else None


def _save(path: Path, size: Size, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps({**content, "size": size.__dict__, "measurement": measure.MEASUREMENT})
    )
    tmp.replace(path)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _measured(folder: Path, size: Size, judge, suites, key: str, model_of, full: bool) -> dict:
    """A model's row on the seed's suites (all of them, or the pruned column's subset),
    measured once and kept in the seed's folder under `key`."""
    path = folder / MEASURED / f"{key}.json"
    saved = _saved(path, size)
    if saved is not None and (saved["row"]["full"] or not full):
        return saved["row"]
    model = model_of()
    on = suites if full else suites.held_out_subset(size.pruned)
    row = {**measure.evaluate(model, judge, on, full), "parameters": models.count_parameters(model)}
    _save(path, size, {"row": row})
    return row


def _arm_seconds(folder: Path, size: Size, name: str, budget: arms.Budget, seconds: float):
    """The arm's time: as it ran now, or, when it was resumed from what it had committed,
    the time it took when it ran."""
    timing = folder / ARMS / f"{name}.json"
    saved = _saved(timing, size)
    if saved is not None and saved.get("budget") == budget.__dict__:
        return saved["seconds"]
    _save(timing, size, {"budget": budget.__dict__, "seconds": seconds})
    return seconds


def run_task(
    task: Task,
    workdir: Path,
    fixture_dir: Path,
    size: Size,
    budget: arms.Budget,
    data: Path,
    grid: Path | None = None,
    log=None,
) -> dict:
    """One arm for one seed: its stages run (or reused), each model it is judged by
    measured on the seed's suites (or read back)."""
    log = log or _log
    seed, name = task.seed, task.arm
    teacher_model, judge, suites = _context(fixture_dir, seed, size)
    layers = len(teacher_model.transformer_blocks)
    arm = arms.catalogue(budget, layers)[name]
    folder = workdir / f"seed-{seed}"
    out: dict = {
        "runs": [],
        "prompts": len(suites.held_out),
        "trainingPrompts": len(suites.training),
    }

    def measured(key: str, model_of, full: bool) -> dict:
        return _measured(folder, size, judge, suites, key, model_of, full)

    if task.teacher:
        row = measured("teacher", lambda: teacher_model, True)
        out["runs"].append({"arm": "teacher", "seed": seed, "stage": "teacher", **row})
        log(f"seed {seed} teacher: score {row['score']:.3f}")
    obj = arms.resource(
        arm,
        seed,
        layers,
        str(fixture_dir / fixtures.TEACHER_DIR),
        str(data),
        str(folder / "store"),
        budget,
    )
    clock = time.perf_counter()
    folders = arms.run_arm(obj)
    trained = time.perf_counter() - clock
    judged = list(presets.MODEL_NAMES) if name == arms.PRESET else ["prune", arm.judged]
    for stage in dict.fromkeys(judged):
        if stage not in folders:
            continue
        # Every table row is measured in full; an arm's pruned model only for the "after
        # prune" column: its held-out score on `size.pruned` prompts.
        full = name == arms.PRESET or stage == arm.judged
        path = folders[stage]
        row = measured(_identity(path), lambda p=path: models.load(p / "model"), full)
        out["runs"].append(
            {"arm": name, "seed": seed, "stage": stage, **row, "keep": _kept(folders)}
        )
    if grid is not None:
        figure(suites.held_out, teacher_model, folders, grid)
    seconds = _arm_seconds(folder, size, name, budget, time.perf_counter() - clock)
    out["armSeconds"] = {"arm": name, "seed": seed, "seconds": round(seconds)}
    final = out["runs"][-1]
    log(
        f"seed {seed} {name}: {final['stage']} {final['score']:.3f} "
        f"(trained {trained:.0f} s, {seconds:.0f} s with measuring)"
    )
    return out
