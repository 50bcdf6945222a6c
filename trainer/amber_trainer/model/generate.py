"""Sampling from a compressed model: `amber generate`.

A diffusers pipeline folder (with `model_index.json`: VAE, text encoder, tokenizer) runs in
`QwenImagePipeline` with the compressed transformer in it. A bare transformer folder (what
`final/` holds) has no text encoder and no VAE: the prompt is then embedded by a seeded
hash of its words (stable across runs; a stand-in, not a language model), the flow-matching
ODE is integrated with Euler steps from noise to x0, and the packed latents are shown as an
image (their first three channels). For the plumbing example that gives a tiny picture
whose pixels come from the real sampling loop of the compressed model.

A model of the shapes task (`data.shapes`: the embedded default and the quality benchmark)
reads all-MiniLM-L6-v2's token states and draws 32x32 RGB pictures as 4x4-pixel tokens; such a
folder carries no text encoder either, so it is recognised by those two widths in its config
and prompted as it was trained: the caption through MiniLM, the picture shown as it is.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from amber_trainer.data import Batch
from amber_trainer.model import models
from amber_trainer.model.forward import FlowInputs, velocity


def hashed_prompt(prompt: str, tokens: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, tokens, width) embeddings and mask: one seeded vector per word."""
    words = prompt.lower().split()[:tokens] or [""]
    rows = []
    for word in words:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        rows.append(torch.randn(width, generator=torch.Generator().manual_seed(seed)))
    text = torch.zeros(1, tokens, width)
    text[0, : len(rows)] = torch.stack(rows)
    mask = torch.zeros(1, tokens, dtype=torch.long)
    mask[0, : len(rows)] = 1
    return text, mask


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching schedulers' resolution shift of times t in [0, 1]: more time at high
    noise when shift > 1 (its inverse is t / (shift - (shift - 1)·t))."""
    return shift * t / (1 + (shift - 1) * t)


def schedule(steps: int, shift: float = 3.0) -> list[float]:
    """The `steps + 1` times an Euler sampler visits, from 1 (noise) to 0, time-shifted."""
    return time_shift(torch.linspace(1.0, 0.0, steps + 1), shift).tolist()


@torch.no_grad()
def euler(model, batch, noise: torch.Tensor, steps: int, shift: float = 3.0) -> torch.Tensor:
    """Integrate dx/dt = v from t=1 (noise) to t=0 with the schedulers' time shift; `batch`
    carries the text (a `data.Batch`)."""
    x = noise
    for t, t_next in itertools.pairwise(schedule(steps, shift)):
        at = torch.full((x.shape[0],), t, device=x.device)
        inputs = FlowInputs(x, batch.text, batch.text_mask, at, batch.img_shapes)
        x = x + (t_next - t) * velocity(model, inputs)
    return x


def sample_latents(
    model, text, mask, side: int, steps: int, seed: int, shift: float = 1.0
) -> torch.Tensor:
    """(1, side², C) packed latents sampled for one prompt from seeded noise."""
    channels = model.config.in_channels
    x = torch.randn(1, side * side, channels, generator=torch.Generator().manual_seed(seed))
    batch = Batch(x, text, mask, [[(1, side, side)]])
    return euler(model, batch, x, steps, shift)


def latents_to_image(latents: torch.Tensor, side: int, patch: int = 2) -> Image.Image:
    """Unpack 2x2-packed latents and show the first three channels as RGB."""
    channels = latents.shape[-1] // (patch * patch)
    grid = latents[0].reshape(side, side, channels, patch, patch)
    grid = grid.permute(2, 0, 3, 1, 4).reshape(channels, side * patch, side * patch)
    rgb = grid[:3] if channels >= 3 else grid[:1].repeat(3, 1, 1)
    lo, hi = rgb.amin(), rgb.amax()
    pixels = ((rgb - lo) / (hi - lo).clamp_min(1e-6) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels)).resize(
        (side * patch * 8, side * patch * 8), Image.NEAREST
    )


def is_shapes_model(config) -> bool:
    """Whether a transformer reads the shapes task's captions and draws its pictures."""
    from amber_trainer.quality import task

    return not task.misfit(dict(config))


def render_shapes(model, prompt: str, steps: int, seed: int) -> Image.Image:
    """A shapes-task picture for `prompt` (MiniLM-encoded), 4x enlarged."""
    from amber_trainer.quality import task, text

    emb, mask = text.encode([prompt])
    noise = torch.randn(
        1, task.SIDE * task.SIDE, task.CHANNELS, generator=torch.Generator().manual_seed(seed)
    )
    batch = Batch(noise, emb, mask, [[(1, task.SIDE, task.SIDE)]])
    image = task.to_images(euler(model, batch, noise, steps, shift=1.0))[0].clamp(-1, 1)
    pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    return Image.fromarray(np.ascontiguousarray(pixels)).resize(
        (task.IMAGE * 4, task.IMAGE * 4), Image.NEAREST
    )


def render(model_dir: Path, prompt: str, steps: int, seed: int, size: int) -> Image.Image:
    """One image for `prompt` from a pipeline folder or a bare transformer folder."""
    model_dir = Path(model_dir)
    if (model_dir / "model_index.json").exists():
        from diffusers import QwenImagePipeline

        transformer = models.load(model_dir / "transformer")
        pipe = QwenImagePipeline.from_pretrained(model_dir, transformer=transformer)
        return pipe(
            prompt=prompt,
            num_inference_steps=steps,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
    model = models.load(model_dir).eval()
    if is_shapes_model(model.config):
        return render_shapes(model, prompt, steps, seed)
    text, mask = hashed_prompt(prompt, 16, model.config.joint_attention_dim)
    side = size // model.config.patch_size
    latents = sample_latents(model, text, mask, side, steps, seed)
    return latents_to_image(latents, side, model.config.patch_size)


LABEL = 18  # pixels of the caption strip above each column of a comparison grid


def grid(rows: list[list[Image.Image]], labels: list[str]) -> Image.Image:
    """Images side by side (one row per prompt), each column captioned."""
    from PIL import ImageDraw

    width, height = rows[0][0].size
    sheet = Image.new("RGB", (width * len(labels), LABEL + height * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, label in enumerate(labels):
        draw.text((column * width + 4, 3), label, fill="black")
    for r, row in enumerate(rows):
        for column, image in enumerate(row):
            sheet.paste(image.convert("RGB"), (column * width, LABEL + r * height))
    return sheet


def generate(
    model_dir: Path,
    prompts: list[str] | str,
    out: Path,
    steps: int = 20,
    seed: int = 0,
    size: int = 16,
    compare: Path | None = None,
) -> Path:
    """The model's image for each prompt; with `compare` (the teacher, say), a grid of that
    model's images beside this one's, same prompts, seed and noise."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    folders = [Path(compare), Path(model_dir)] if compare else [Path(model_dir)]
    rows = [[render(f, prompt, steps, seed, size) for f in folders] for prompt in prompts]
    if compare is None and len(prompts) == 1:
        image = rows[0][0]
    else:
        image = grid(rows, [f.name if f.name != "final" else f.parent.name for f in folders])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
