"""Where `amber run`'s time goes, stage by stage: the warm worker against torchrun per stage.

    python bench/local_run.py [--resource manifests/examples/amber-random.yaml]

Runs the resource's whole pipeline twice into fresh temporary stores, first with every stage
under its own `torchrun` (the baseline: what `amber run` did before the warm worker), then as
`amber run` does now, and prints for each stage, from the times its events arrived:

- start-up: launch until the trainer's `started` event (torchrun, imports, the gang, storage);
- setup: `started` until the first training step (inputs fetched, models built, engine);
- training: first to last step; a stage with no steps (prune, score) has none;
- finish: after the last step until the stage returned (outputs written and committed).

Overhead is everything but training. Each run's stores start empty (nothing reused), and
the machine is assumed warm: packages installed and imported once before timing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from amber import local
from amber.resource import load


def profile(obj, launcher: str) -> tuple[dict[str, dict[str, float]], float]:
    marks: dict[str, dict[str, float]] = {}

    def on_event(run, event: dict) -> None:
        now = time.perf_counter()
        stage = marks.setdefault(run.stage.name, {})
        kind = event["event"]
        if kind == "progress":
            stage.setdefault("first_step", now)
            stage["last_step"] = now
        elif kind in ("started", "result"):
            stage.setdefault(kind, now)

    with tempfile.TemporaryDirectory() as store:
        started = time.perf_counter()
        launched: dict[str, float] = {}
        # A stage is launched about when the one before it reported its result.
        previous = [started]

        def timed(run, event):
            if run.stage.name not in launched:
                launched[run.stage.name] = previous[0]
            on_event(run, event)
            if event["event"] == "result":
                previous[0] = time.perf_counter()

        outcomes, _ = local.run_resource(obj, store, launcher=launcher, on_event=timed)
        seconds = time.perf_counter() - started
    table = {}
    for outcome in outcomes:
        m = marks[outcome.stage]
        start = launched[outcome.stage]
        end = start + outcome.seconds
        first = m.get("first_step", m["result"])
        last = m.get("last_step", first)
        table[outcome.stage] = {
            "start-up": m["started"] - start,
            "setup": first - m["started"],
            "training": last - first,
            "finish": end - last,
            "total": outcome.seconds,
        }
    return table, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--resource", type=Path, default=Path("manifests/examples/amber-random.yaml")
    )
    args = parser.parse_args()
    obj = load(args.resource)
    import amber_trainer.entry  # noqa: F401 - warm: packages imported once before timing

    runs = {name: profile(obj, name) for name in ("torchrun", "auto")}
    columns = ["start-up", "setup", "training", "finish"]
    print(f"{args.resource}: seconds per stage, torchrun per stage | warm worker (amber run)")
    header = " | ".join(f"{c:>8}" for c in columns)
    print(f"{'stage':<10} {header} {'overhead':>8} || {header} {'overhead':>8}")
    for stage in runs["auto"][0]:
        cells = []
        for name in ("torchrun", "auto"):
            row = runs[name][0][stage]
            overhead = row["total"] - row["training"]
            cells.append(" | ".join(f"{row[c]:8.2f}" for c in columns) + f" {overhead:8.2f}")
        print(f"{stage:<10} {cells[0]} || {cells[1]}")
    base, warm = runs["torchrun"][1], runs["auto"][1]
    over = {name: sum(r["total"] - r["training"] for r in runs[name][0].values()) for name in runs}
    print(
        f"whole run: torchrun {base:.1f} s, warm worker {warm:.1f} s ({warm / base:.2f}x); "
        f"overhead {over['torchrun']:.1f} s -> {over['auto']:.1f} s "
        f"({over['auto'] / max(over['torchrun'], 1e-9):.2f}x)"
    )


if __name__ == "__main__":
    main()
