"""The oracle sweep (trainer/amber_trainer/quality/oracle.py): recover a few hundred keep sets
of the benchmark's 24-block teacher with the preset's budget and print how well each pruning
criterion's ranking predicts the post-recovery score (Spearman).

    python bench/oracle.py                     # 300 keep sets: needs a GPU (~10 min on an H200)
    python bench/oracle.py --tiny              # a 6-block random teacher, 3 keep sets: CPU test

Results go to bench/results/oracle-{device}.json (and are printed); docs/quality.md quotes
them. Training runs on the GPU when there is one; judging runs on the CPU cores.
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
RESULTS = ROOT / "bench" / "results"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-sets", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=4096, help="pooled teacher targets")
    parser.add_argument("--tiny", action="store_true", help="random 6-block teacher, CPU test")
    parser.add_argument("--out", type=Path, help="result file (default: bench/results/)")
    args = parser.parse_args(argv)

    import torch

    from amber_trainer import data
    from amber_trainer.model import models
    from amber_trainer.quality import arms, benchmark, fixtures, measure, oracle

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    judge = fixtures.load_judge(FIXTURES)
    if args.tiny:
        model = models.build({**fixtures.CONFIG, "num_layers": 6}, seed=args.seed).eval()
        recipe = oracle.Recipe(distill_steps=3, finetune_steps=3, micro_batch=4, warmup_steps=1)
        samples, held_out, training, calibration = 256, 12, 6, 16
        count = min(args.keep_sets, 3)
    else:
        model = fixtures.load_teacher(FIXTURES)
        budget = arms.Budget()
        recipe = oracle.Recipe(
            finetune_steps=budget.finetune_steps,
            micro_batch=budget.micro_batch,
            learning_rate=budget.learning_rate,
        )
        samples, held_out, training = benchmark.DATA_SAMPLES, None, None
        calibration, count = budget.calibration_samples, args.keep_sets
    with tempfile.TemporaryDirectory(prefix="amber-oracle-") as tmp:
        folder = arms.write_data(Path(tmp), samples, benchmark.DATA_SEED)
        train, _ = data.load_shards([folder / "pairs-00000.safetensors"]).split()
    suites = measure.suites(model, args.seed, held_out, training)
    log(f"{count} keep sets on {device}; {len(suites.held_out)} held-out prompts")
    result = oracle.sweep(
        model,
        judge,
        train,
        suites,
        count,
        recipe,
        pool=min(args.pool, samples),
        seed=args.seed,
        calibration_samples=calibration,
        device=device,
        log=log,
    )
    result["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result["tiny"] = args.tiny
    out = args.out or RESULTS / f"oracle-{'tiny' if args.tiny else device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    width = max(len(n) for n in result["spearman"])
    print(f"{'predictor':<{width}}  spearman (soft)  spearman (strict)")
    for name, rho in result["spearman"].items():
        print(f"{name:<{width}}  {rho:+15.3f}  {result['spearmanStrict'][name]:+17.3f}")
    log(f"wrote {out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
