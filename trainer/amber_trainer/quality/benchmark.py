"""One benchmark run: every arm for every seed, each stage's model measured.

The arms run in the given order; later arms of a seed reuse the stages they share with
earlier ones. A committed folder is measured once, however many arms share it.
"""

from __future__ import annotations

import time
from pathlib import Path

from amber_trainer import models
from amber_trainer.quality import arms, measure, report, task, teacher


def figure(suite, teacher_model, outputs: dict, path: Path, rows: int = 8) -> None:
    """Real rendering, teacher, 10B-style and 6B-style on the same prompts and noise."""
    picks = suite.subset([round(i * len(suite) / rows) for i in range(rows)])
    columns = {
        "real": task.to_images(picks.batch.latents),
        "teacher": measure.generate(teacher_model, picks),
    }
    for stage, label in (("finetune", "10B-style"), ("fuse", "6B-style")):
        if stage in outputs:
            columns[label] = measure.generate(models.load(outputs[stage] / "model"), picks)
    report.sample_grid(columns, [s.caption for s in picks.scenes], path)


def run(
    seeds: list[int],
    workdir: Path,
    arm_names: list[str],
    fixtures: Path,
    limit: int | None = None,
    budget: arms.Budget | None = None,
    grid: Path | None = None,
    log=print,
) -> dict:
    """Run the arms for every seed; the measurements, the teacher's first."""
    budget = budget or arms.Budget()
    fixtures_teacher = teacher.load_teacher(fixtures)
    judge = teacher.load_judge(fixtures)
    suite = measure.suite(limit=limit)
    data = arms.write_data(workdir / "data", samples=4096, seed=100)
    log(f"{len(suite)} held-out prompts; training data {data}")
    results = {
        "prompts": len(suite),
        "teacher": measure.evaluate(fixtures_teacher, fixtures_teacher, judge, suite),
        "runs": [],
    }
    results["teacher"]["parameters"] = models.count_parameters(fixtures_teacher)
    log(f"teacher: score {results['teacher']['score']:.3f}")
    measured: dict[str, dict] = {}  # committed folder -> measurement (shared stages once)
    for seed in seeds:
        committed: dict = {}
        for arm in arm_names:
            obj = arms.resource(
                arm,
                seed,
                str(fixtures / teacher.TEACHER_DIR),
                str(data),
                str(workdir / "store"),
                budget,
            )
            started = time.perf_counter()
            outputs = arms.run_arm(obj, committed)
            trained = time.perf_counter() - started
            judged = report.MAIN[1] if arm in report.PRESETS else ("prune", report.FINAL[arm])
            for stage, folder in outputs.items():
                if stage not in judged:
                    continue
                key = str(folder.resolve())
                if key not in measured:
                    model = models.load(folder / "model")
                    measured[key] = {
                        **measure.evaluate(model, fixtures_teacher, judge, suite),
                        "parameters": models.count_parameters(model),
                    }
                results["runs"].append({"arm": arm, "seed": seed, "stage": stage, **measured[key]})
            if grid is not None and seed == seeds[0] and arm == "amber-6b":
                figure(suite, fixtures_teacher, outputs, grid)
            final = results["runs"][-1]
            log(f"seed {seed} {arm}: {final['stage']} {final['score']:.3f} ({trained:.0f} s)")
    return results
