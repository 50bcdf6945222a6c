"""The compositional quality benchmark (results and method in docs/quality.md).

    python bench/quality.py fixtures               # train and gate the teacher (committed)
    python bench/quality.py run                    # every arm, seeds 0 1 2 -> docs/quality.md
    python bench/quality.py run --seeds 3 4 5      # any seeds (the doc is rewritten)
    python bench/quality.py run --quick --seeds 5  # one seed, fewer prompts: printed only
    python bench/quality.py run --workdir DIR      # kept; run again to go on after a cut
    python bench/quality.py run --settled          # and the arms whose question is settled

Every arm is an AmberCompression run through `amber run`'s code path (stages in this
process) on the committed teacher; every judged model is sampled on the held-out prompts
and read by the judge. Raw numbers go to bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "bench" / "quality"
RESULTS = ROOT / "bench" / "results" / "quality.json"
DOC = ROOT / "docs" / "quality.md"
FIGURE = ROOT / "docs" / "quality-samples.png"


# --quick: the preset, the strongest baseline of the first benchmark, and the floor.
QUICK_ARMS = ["amber-6b", "block-influence", "broken"]


def default_arms(settled: bool = False) -> list[str]:
    """The full run's arms in catalogue order (amber-10b is not one: its model is amber-6b's
    finetune stage; nor are probes measured once, which run when named), with `settled`
    the arms whose question is settled too (`arms.SETTLED`)."""
    from amber_trainer.quality import arms, fixtures

    catalogue = arms.catalogue(arms.Budget(), fixtures.CONFIG["num_layers"])
    return [
        name
        for name, arm in catalogue.items()
        if arm.full_run or (settled and name in arms.SETTLED)
    ]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fixtures = sub.add_parser("fixtures", help="train the judge and the teacher")
    fixtures.add_argument("--steps", type=int, help="teacher optimiser steps (default 6000)")
    fixtures.add_argument(
        "--checkpoint", type=Path, help="training state (default ~/.cache/amber/teacher.pt)"
    )
    fixtures.add_argument("--out", type=Path, default=FIXTURES)
    run = sub.add_parser("run", help="run the benchmark and write docs/quality.md")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="any integers")
    run.add_argument(
        "--quick", action="store_true", help="the first seed only, fewer prompts, no doc"
    )
    run.add_argument("--arms", nargs="+", help="arm names (default: all, in catalogue order)")
    run.add_argument(
        "--settled",
        action="store_true",
        help="the settled arms too (arms.SETTLED: out of the full run, which has a budget)",
    )
    run.add_argument(
        "--jobs",
        type=int,
        help="processes the arms run in (default: one per core)",
    )
    run.add_argument(
        "--workdir",
        type=Path,
        help="where stages and per-seed results are kept (default: a temporary folder); "
        "a run started again on the same folder goes on where it stopped",
    )
    args = parser.parse_args(argv)
    if args.command == "fixtures":
        from amber_trainer.quality import fixtures

        steps = args.steps or fixtures.STEPS
        report = fixtures.build(args.out, steps, log, args.checkpoint)
        print(json.dumps(report, indent=2))
        return 0
    from amber_trainer.quality import arms, benchmark, report

    started = time.perf_counter()
    seeds = args.seeds[:1] if args.quick else args.seeds
    names = args.arms or (QUICK_ARMS if args.quick else default_arms(args.settled))
    with tempfile.TemporaryDirectory(prefix="amber-quality-") as tmp:
        results = benchmark.run(
            seeds,
            args.workdir or Path(tmp),
            names,
            FIXTURES,
            benchmark.QUICK if args.quick else benchmark.Size(),
            arms.Budget(),
            None if args.quick else FIGURE,
            log,
            args.jobs or os.cpu_count() or 1,
        )
    results["seconds"] = round(time.perf_counter() - started)
    log(f"done in {results['seconds']} s")
    if not args.quick:
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        report.write(results, DOC, FIGURE, FIXTURES)
        log(f"wrote {DOC.relative_to(ROOT)} and {RESULTS.relative_to(ROOT)}")
    else:
        print(report.tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
