"""The benchmark's sampling, all prompts at once vs in `measure.GENERATE_CHUNK` chunks, side
by side on one CPU thread (the same images either way; the script checks).

    python bench/sampling.py [--repeats 3] [--threads 1]

The model is the quality teacher cut to its first 12 blocks (a 10B-style model's size);
the prompts are seed 0's held-out suite (414). Prints seconds per pass and the ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from amber_trainer.model.generate import euler
from amber_trainer.quality import fixtures, measure, task

FIXTURES = Path(__file__).parent / "quality"


def whole(model, s: measure.Suite) -> torch.Tensor:
    tokens = euler(model.eval(), s.batch, s.noise, measure.SAMPLE_STEPS, shift=measure.SHIFT)
    return task.to_images(tokens).clamp(-1, 1)


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = copy.deepcopy(fixtures.load_teacher(FIXTURES))
    model.transformer_blocks = model.transformer_blocks[:12]
    s = measure.suite(seed=0)
    base, expected = timed(lambda: whole(model, s), args.repeats)
    chunked, got = timed(lambda: measure.generate(model, s), args.repeats)
    print(f"{len(s)} prompts, {measure.SAMPLE_STEPS} steps, {args.threads} thread(s)")
    print(f"all at once      {base:6.2f} s")
    print(
        f"chunks of {measure.GENERATE_CHUNK:<6} {chunked:6.2f} s   speed-up x{base / chunked:.2f}"
    )
    print(f"same images: {torch.equal(expected, got)}")


if __name__ == "__main__":
    main()
