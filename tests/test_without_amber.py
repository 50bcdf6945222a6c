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

from amber_trainer import models
from amber_trainer.hybrid import CODE_FILE
from amber_trainer.stages.common import MODEL_DIR, save_model

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
    config = {**models.TINY, "num_layers": 4, "num_single_layers": single}
    if not single:
        del config["num_single_layers"]
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
