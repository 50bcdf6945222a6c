"""`amber generate`: the compressed model in the sampling loop, writing an image."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from amber_trainer.model import generate, models
from amber_trainer.surgery import fuse


def test_generate_runs_the_model_in_the_sampling_loop(tmp_path):
    model = fuse.convert(models.build(models.named_config("tiny"), seed=2), 3)
    model.save_pretrained(tmp_path / "final")
    outs = []
    for seed in (0, 0, 1):
        out = tmp_path / f"img-{len(outs)}.png"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "amber",
                "generate",
                "--model",
                str(tmp_path / "final"),
                "--prompt",
                "a red square",
                "--steps",
                "4",
                "--seed",
                str(seed),
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        outs.append(np.asarray(Image.open(out)))
    assert outs[0].shape == (128, 128, 3)
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_sampling_follows_the_velocity_field():
    # A model that predicts v = ε - x0 exactly would carry noise to x0; with zero velocity
    # the Euler steps must leave the noise untouched.
    model = models.build(models.named_config("tiny", num_layers=2), seed=0)
    with torch.no_grad():
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
    text, mask = generate.hashed_prompt("x", 4, 32)
    x = generate.sample_latents(model, text, mask, side=4, steps=3, seed=7)
    noise = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(x, noise)
    assert generate.hashed_prompt("A b", 4, 8)[0][0, 0].equal(
        generate.hashed_prompt("a", 4, 8)[0][0, 0]
    )


def test_compare_puts_the_teachers_images_beside_the_models(tmp_path):
    teacher = models.build(models.named_config("tiny"), seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    fuse.convert(models.build(models.named_config("tiny"), seed=2), 3).save_pretrained(
        tmp_path / "run" / "final"
    )
    prompts = ["a red square", "two blue circles"]
    sheet = generate.generate(
        tmp_path / "run" / "final",
        prompts,
        tmp_path / "grid.png",
        4,
        3,
        compare=tmp_path / "teacher",
    )
    grid = np.asarray(Image.open(sheet))
    alone = [
        [np.asarray(generate.render(tmp_path / f, p, 4, 3, 16)) for f in ("teacher", "run/final")]
        for p in prompts
    ]
    height, width = alone[0][0].shape[:2]
    assert grid.shape == (generate.LABEL + 2 * height, 2 * width, 3)
    for r, row in enumerate(alone):
        for c, image in enumerate(row):
            top = generate.LABEL + r * height
            cell = grid[top : top + height, c * width : (c + 1) * width]
            assert np.array_equal(cell, image), (r, c)  # same prompt, seed and noise
    assert not np.array_equal(alone[0][0], alone[0][1])  # two models, two pictures
    header = grid[: generate.LABEL]
    assert (header < 128).any()  # the column captions are drawn
