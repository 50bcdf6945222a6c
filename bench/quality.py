"""The compositional quality benchmark (brief section 7; results in docs/quality.md).

    python bench/quality.py fixtures        # train the judge and the teacher (committed)
    python bench/quality.py run             # preset + ablations, 3 seeds -> docs/quality.md
    python bench/quality.py run --quick     # one seed, 48 prompts: a smoke run

Every arm is an AmberCompression run through `amber run`'s code path (stages in this
process) on the committed teacher; every stage's model is sampled on the held-out prompts
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

# Arms in the order they run (later arms reuse earlier arms' shared stages).
ORDER = [
    "amber-6b",
    "amber-10b",
    "one-shot-fusion",
    "finetune-only",
    "init-keep",
    "uniform",
    "first",
    "block-influence",
    "random",
    "broken",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fixtures = sub.add_parser("fixtures", help="train the judge and the teacher")
    fixtures.add_argument("--steps", type=int, default=3000, help="teacher optimiser steps")
    fixtures.add_argument("--out", type=Path, default=FIXTURES)
    run = sub.add_parser("run", help="run the benchmark and write docs/quality.md")
    run.add_argument("--seeds", type=int, default=3)
    run.add_argument("--quick", action="store_true", help="one seed, 48 prompts, no doc")
    run.add_argument("--arms", nargs="*", default=ORDER)
    args = parser.parse_args(argv)
    if args.command == "fixtures":
        from amber_trainer.quality import teacher

        report = teacher.build(args.out, steps=args.steps, log=log)
        print(json.dumps(report, indent=2))
        return 0
    from amber_trainer.quality import arms, benchmark, report

    started = time.perf_counter()
    seeds = list(range(1 if args.quick else args.seeds))
    with tempfile.TemporaryDirectory(prefix="amber-quality-") as tmp:
        results = benchmark.run(
            seeds,
            Path(tmp),
            args.arms,
            FIXTURES,
            48 if args.quick else None,
            arms.Budget(),
            None if args.quick else FIGURE,
            log,
        )
    results["seconds"] = round(time.perf_counter() - started)
    results["threads"] = __import__("torch").get_num_threads()
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
