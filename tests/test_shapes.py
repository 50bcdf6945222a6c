"""The embedded default: the benchmark's trained teacher compressed on the shapes task, with
the eval stage's judged table (what the teacher and every model draw on held-out prompts)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from amber.api import AmberCompression
from amber_trainer import data
from amber_trainer.model import generate
from amber_trainer.quality import fixtures, task
from trainer_helpers import ROOT, trainer_env

TINY = ROOT / "manifests" / "examples" / "amber-tiny.yaml"
FIXTURES = ROOT / "bench" / "quality"


def test_shapes_data_are_the_tasks_pairs_and_refuse_another_teacher():
    train, held = data.shapes_datasets(fixtures.CONFIG, 40, 3)
    assert (len(train), train.side, tuple(train.latents.shape[1:])) == (40, 8, (64, 48))
    assert len(held) == len(task.split()[1])  # one rendering of every held-out combination
    assert train.text.shape[-1] == 384 and bool((train.text_mask.sum(1) >= 3).all())
    again, _ = data.shapes_datasets(fixtures.CONFIG, 40, 3)
    assert bool((again.latents == train.latents).all())  # every stage renders the same rows
    with pytest.raises(ValueError, match=r"data.shapes: .*'joint_attention_dim': 32"):
        data.shapes_datasets({**fixtures.CONFIG, "joint_attention_dim": 32}, 8, 0)


def test_a_resource_names_one_data_source():
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["data"]["synthetic"] = {}
    with pytest.raises(ValueError, match=r"exactly one of uri .*synthetic and shapes"):
        AmberCompression.model_validate(doc)


def test_a_judge_that_does_not_match_its_checksum_is_refused(tmp_path):
    folder = tmp_path / "fixtures"
    folder.mkdir()
    shutil.copy(FIXTURES / fixtures.JUDGE_FILE, folder)
    shutil.copy(FIXTURES / fixtures.SUMS, folder)
    fixtures.load_judge(folder)  # intact, without the teacher beside it
    raw = bytearray((folder / fixtures.JUDGE_FILE).read_bytes())
    raw[-1] ^= 1
    (folder / fixtures.JUDGE_FILE).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum differs"):
        fixtures.load_judge(folder)
    (folder / fixtures.SUMS).write_text("")
    with pytest.raises(ValueError, match=r"lists no judge\.safetensors"):
        fixtures.load_judge(folder)


@pytest.mark.slow
def test_the_embedded_default_compresses_the_teacher_and_shows_what_it_draws(tmp_path):
    # The README's example with a tenth of its steps: same stages, data, judge and table.
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["teacher"]["uri"] = str(FIXTURES / "teacher")
    doc["spec"]["data"]["shapes"].update(samples=512, judgeUri=str(FIXTURES))
    doc["spec"]["storage"]["uri"] = str(tmp_path / "store")
    doc["spec"]["overrides"]["score"]["calibrationSamples"] = 16
    doc["spec"]["overrides"]["finetune"].update(steps=20, checkpointEvery=10)
    doc["spec"]["overrides"]["fuse"].update(steps=10, finetuneSteps=5, checkpointEvery=10)
    resource = tmp_path / "tiny.yaml"
    resource.write_text(yaml.safe_dump(doc))
    out = subprocess.run(
        [sys.executable, "-m", "amber", "run", str(resource)],
        capture_output=True,
        text=True,
        env={**trainer_env(), "COLUMNS": "120"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "69 held-out prompts, scored by the task's judge" in out.stdout
    for model in ("teacher", "pruned", "10B-style", "6B-style"):
        assert f"│ {model} " in out.stdout, out.stdout

    run = tmp_path / "store" / "default" / "amber-tiny"
    eval_out = run / "eval" / "output"
    judged = json.loads((eval_out / "eval.json").read_text())["judged"]
    assert list(judged) == ["teacher", "prune", "finetune", "fuse"]
    assert judged["teacher"]["score"] >= 0.9  # the fixture's gate, on these 69 prompts
    assert judged["teacher"]["parameters"] == 3_648_304
    assert judged["fuse"]["parameters"] < judged["finetune"]["parameters"] < 3_648_304
    for entry in judged.values():
        assert entry["prompts"] == 69 and set(entry["attributes"]) == set(task.ATTRIBUTES)
    grid = Image.open(eval_out / "judged.png")
    assert grid.width > 5 * 100  # real rendering and four models side by side

    page = (run / "report.html").read_text()
    assert "What the models draw" in page and page.count("data:image/png") >= 4
    assert page.count('alt="held-out prompts drawn by each model"') == 1
    assert "eval: judged.png" not in page  # shown once, at the top

    # The compressed model is prompted as it was trained: MiniLM captions, real pictures.
    picture = generate.generate(
        run / "final", ["a large red circle on the left"], tmp_path / "one.png", steps=10
    )
    pixels = np.asarray(Image.open(picture).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (128, 128, 3) and pixels.std() > 10  # a drawing, not a flat field
