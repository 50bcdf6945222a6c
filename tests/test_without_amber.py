"""A model folder Amber writes loads with plain diffusers, in a Python where Amber is not
installed: a virtualenv that sees the machine's packages (torch, diffusers, transformers)
but not the editable install of this repository, whose path hook lives in a .pth file that
a site directory added by another .pth is not scanned for."""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amber_trainer.model import models
from amber_trainer.model.hybrid import CODE_FILE
from amber_trainer.stages.outputs import MODEL_DIR, save_model

pytestmark = pytest.mark.slow

FORWARD = """
import importlib.util, sys, torch
from diffusers import AutoModel
assert all(importlib.util.find_spec(m) is None for m in ("amber", "amber_trainer"))
folder, inputs, out, trust = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
model = AutoModel.from_pretrained(folder, trust_remote_code=trust).eval()
x = torch.load(inputs)
with torch.no_grad():
    y = model(**x, return_dict=False)[0]
torch.save({"y": y, "class": type(model).__name__, "module": type(model).__module__}, out)
"""


@pytest.fixture(scope="module")
def python_without_amber(tmp_path_factory):
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    packages = next(Path(env).glob("lib/python*/site-packages"))
    (packages / "machine.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return env / "bin" / "python"


def inputs(config, path):
    torch.manual_seed(0)
    side, tokens = 4, 5
    x = {
        "hidden_states": torch.randn(1, side * side, config["in_channels"]),
        "encoder_hidden_states": torch.randn(1, tokens, config["joint_attention_dim"]),
        "encoder_hidden_states_mask": torch.ones(1, tokens, dtype=torch.long),
        "timestep": torch.tensor([0.4]),
        "img_shapes": [[(1, side, side)]],
    }
    torch.save(x, path)
    return x


@pytest.mark.parametrize(
    ("single", "expected"),
    [(2, "AmberHybridTransformer2DModel"), (0, "QwenImageTransformer2DModel")],
    ids=["6B-style hybrid", "10B-style pruned"],
)
def test_a_saved_model_loads_and_runs_with_plain_diffusers(
    python_without_amber, tmp_path, single, expected
):
    # The hybrid's single blocks carry a text correction: its code travels in the folder too.
    config = {**models.TINY, "num_layers": 4, "num_single_layers": single, "single_text_rank": 4}
    if not single:
        del config["num_single_layers"], config["single_text_rank"]
    model = models.build(config, seed=3).eval()
    save_model(model, tmp_path, None)
    folder = tmp_path / MODEL_DIR
    saved = json.loads((folder / "config.json").read_text())
    assert ("auto_map" in saved) == bool(single) and (folder / CODE_FILE).exists() == bool(single)
    x = inputs(config, tmp_path / "x.pt")
    with torch.no_grad():
        mine = model(**x, return_dict=False)[0]

    out = tmp_path / "y.pt"
    args = [folder, tmp_path / "x.pt", out, "1" if single else "0"]
    done = subprocess.run(
        [str(python_without_amber), "-c", FORWARD, *map(str, args)],
        cwd=tmp_path,  # not the repository: nothing of Amber on the path
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(out)
    assert theirs["class"] == expected
    if single:  # the class came from the folder's own file, not from an installed package
        assert theirs["module"].endswith(CODE_FILE.removesuffix(".py"))
    torch.testing.assert_close(theirs["y"], mine)


PIPELINE = """
import importlib.util, json, sys, torch
from diffusers import DiffusionPipeline, QwenImagePipeline
assert all(importlib.util.find_spec(m) is None for m in ("amber", "amber_trainer"))
folder, trust = sys.argv[1], sys.argv[2] == "1"
seen = []
for loader in (DiffusionPipeline, QwenImagePipeline):
    pipe = loader.from_pretrained(folder, trust_remote_code=trust)
    image = pipe(
        prompt="a red circle on the left", num_inference_steps=2, height=32, width=32,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images[0]
    seen.append([type(pipe).__name__, type(pipe.transformer).__name__, list(image.shape),
                 float(image.std())])
print(json.dumps(seen))
"""


@pytest.mark.parametrize(
    ("preset", "expected"),
    [("amber-6b", "AmberHybridTransformer2DModel"), ("amber-10b", "QwenImageTransformer2DModel")],
)
def test_a_pipeline_teacher_gives_a_pipeline_that_plain_diffusers_runs(
    python_without_amber, tmp_path, preset, expected
):
    import yaml

    from amber_trainer.data import encoders
    from trainer_helpers import ROOT, trainer_env

    teacher = encoders.tiny_pipeline(tmp_path / "teacher")
    doc = yaml.safe_load((ROOT / "manifests/examples/amber-random.yaml").read_text())
    doc["spec"]["teacher"] = {"uri": str(teacher), "numLayers": 12}
    doc["spec"]["storage"]["uri"] = str(tmp_path / "store")
    doc["spec"]["preset"] = preset
    if preset == "amber-10b":
        del doc["spec"]["overrides"]["fuse"]
    resource = tmp_path / "pipe.yaml"
    resource.write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        [sys.executable, "-m", "amber", "run", str(resource)],
        capture_output=True, text=True, env=trainer_env(), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    final = tmp_path / "store" / "default" / "amber-random" / "final"
    index = json.loads((final / "model_index.json").read_text())
    assert index["transformer"][1] == expected
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert sorted(p.name for p in (final / part).iterdir()) == sorted(
            p.name for p in (teacher / part).iterdir()
        )
    marker = json.loads((final / "COMMIT.json").read_text())
    assert (
        "text_encoder/config.json" in marker["files"]
        and "transformer/config.json" in (marker["files"])
    )
    assert not (final / "config.json").exists()  # the transformer lives in transformer/

    ran = subprocess.run(
        [str(python_without_amber), "-c", PIPELINE, str(final), "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    for pipeline, transformer, shape, spread in json.loads(ran.stdout.splitlines()[-1]):
        assert pipeline == "QwenImagePipeline" and transformer == expected
        assert shape == [32, 32, 3] and spread > 0  # an image came out of the sampling loop
