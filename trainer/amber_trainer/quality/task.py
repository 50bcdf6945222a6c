"""Scenes of one or two coloured shapes, their captions, and their pictures.

A scene is either one object with a size and a position ("a large red circle on the left")
or two small objects side by side ("a red circle left of a blue square", "two green
triangles"). Every combination of attributes is a *combination*; a fixed fifth of them is
held out of training, so the benchmark asks for scenes the teacher has never seen, only
their parts (GenEval-style compositional generalisation). Images are 32x32 RGB in [-1, 1];
the models see them as 8x8 tokens of 4x4x3 pixels, the way Qwen-Image sees 2x2 patches of
VAE latents.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

SHAPES = ("square", "circle", "triangle")
COLOURS = {
    "red": (225, 45, 45),
    "green": (45, 200, 70),
    "blue": (55, 95, 235),
    "yellow": (235, 215, 45),
    "purple": (165, 65, 210),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
ATTRIBUTES = ("count", "shape", "colour", "size", "position")

IMAGE = 32  # pixels per side
PATCH = 4  # pixels per token side
SIDE = IMAGE // PATCH  # tokens per side
CHANNELS = 3 * PATCH * PATCH  # values per token
HELD_OUT_FRACTION = 0.2
_SPLIT_SEED = 7  # fixes which combinations are held out; never change it with results


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # one, or two from left to right
    size: str = "small"  # one object only
    position: str = "centre"  # one object only

    @property
    def count(self) -> int:
        return len(self.objects)

    @property
    def caption(self) -> str:
        if self.count == 1:
            o = self.objects[0]
            return f"a {self.size} {o.colour} {o.shape} on the {self.position}"
        left, right = self.objects
        if left == right:
            return f"two {left.colour} {left.shape}s"
        return f"a {left.colour} {left.shape} left of a {right.colour} {right.shape}"


def combinations() -> list[Scene]:
    """Every scene the task can ask for, in a fixed order."""
    objs = [Obj(s, c) for c in COLOURS for s in SHAPES]
    singles = [Scene((o,), size, pos) for o in objs for size in SIZES for pos in POSITIONS]
    pairs = [Scene((a, b)) for a, b in itertools.product(objs, objs)]
    return singles + pairs


def misfit(config: dict) -> dict:
    """What keeps a transformer config from reading this task's captions (MiniLM states) and
    drawing its pictures (4x4x3-pixel tokens in 2x2 patches): key -> its value; empty when
    it fits."""
    from amber_trainer.quality import text

    wanted = {"in_channels": CHANNELS, "joint_attention_dim": text.WIDTH, "patch_size": 2}
    given = {"patch_size": 2, **config}  # diffusers' default patch size
    return {k: given.get(k) for k, v in wanted.items() if given.get(k) != v}


def split() -> tuple[list[Scene], list[Scene]]:
    """(training combinations, held-out combinations): a fixed random fifth of the singles
    and of the pairs is held out, and every object and single attribute value still
    appears in training."""
    rng = random.Random(_SPLIT_SEED)
    train, held = [], []
    for group in (lambda s: s.count == 1, lambda s: s.count == 2):
        scenes = [s for s in combinations() if group(s)]
        rng.shuffle(scenes)
        cut = round(len(scenes) * HELD_OUT_FRACTION)
        held += scenes[:cut]
        train += scenes[cut:]
    return train, held


def _box(scene: Scene, index: int, rng: random.Random) -> tuple[float, float, float]:
    """Centre x, centre y and side length in pixels of object `index`, jittered."""
    if scene.count == 2:
        side = 11 + rng.uniform(-1, 1)
        cx = (8 if index == 0 else 24) + rng.uniform(-1.5, 1.5)
        return cx, 16 + rng.uniform(-3, 3), side
    side = (9 if scene.size == "small" else 15) + rng.uniform(-1, 1)
    near, far, mid = 8.5, 23.5, 16
    cx, cy = {
        "left": (near, mid),
        "right": (far, mid),
        "top": (mid, near),
        "bottom": (mid, far),
    }[scene.position]
    return cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5), side


def render(scene: Scene, seed: int) -> torch.Tensor:
    """The scene as a (3, 32, 32) tensor in [-1, 1]: drawn at 4x and box-filtered down, so
    edges are anti-aliased; position, size and colour are jittered by `seed`."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    scale = 4
    canvas = Image.new("RGB", (IMAGE * scale, IMAGE * scale), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, obj in enumerate(scene.objects):
        cx, cy, side = (v * scale for v in _box(scene, i, rng))
        colour = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[obj.colour])
        h = side / 2
        if obj.shape == "square":
            draw.rectangle((cx - h * 0.9, cy - h * 0.9, cx + h * 0.9, cy + h * 0.9), fill=colour)
        elif obj.shape == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=colour)
        else:
            draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=colour)
    small = canvas.resize((IMAGE, IMAGE), Image.Resampling.BOX)
    pixels = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8)
    return pixels.view(IMAGE, IMAGE, 3).permute(2, 0, 1).float() / 127.5 - 1


def sample(scenes: list[Scene], count: int, seed: int) -> list[tuple[Scene, int]]:
    """`count` (scene, render seed) pairs drawn uniformly from `scenes`."""
    rng = random.Random(seed)
    return [(rng.choice(scenes), rng.randrange(2**31)) for _ in range(count)]


def to_tokens(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) pixels -> (B, 64, 48) tokens: 4x4 patches, row-major."""
    b = images.shape[0]
    x = images.reshape(b, 3, SIDE, PATCH, SIDE, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, SIDE * SIDE, CHANNELS)


def to_images(tokens: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_tokens`."""
    b = tokens.shape[0]
    x = tokens.reshape(b, SIDE, SIDE, 3, PATCH, PATCH)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, IMAGE, IMAGE)


def labels(scene: Scene) -> dict[str, int]:
    """The judge's targets for a scene; -1 where an attribute does not apply."""
    first = scene.objects[0]
    second = scene.objects[-1] if scene.count == 2 else None
    return {
        "count": scene.count - 1,
        "shape": SHAPES.index(first.shape),
        "colour": list(COLOURS).index(first.colour),
        "size": SIZES.index(scene.size) if scene.count == 1 else -1,
        "position": POSITIONS.index(scene.position) if scene.count == 1 else -1,
        "shape2": SHAPES.index(second.shape) if second else -1,
        "colour2": list(COLOURS).index(second.colour) if second else -1,
    }
