"""Adding a stage type is one stage class and one runner: this test adds a `note` stage to a
copy of the packages, exactly as docs/design.md ("Adding a stage type") shows, and plans,
validates and runs it through `amber run`, with nothing else edited."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from amber.storage import open_store
from trainer_helpers import ROOT, trainer_env

# The two additions, as docs/design.md shows them.
NOTE_STAGE = '''
class NoteStage(StageBase):
    """Writes a short note into storage, after the model it follows."""

    type: Literal["note"] = "note"
    text: str = Field("", max_length=200, description="text: what the note says.")

'''
NOTE_RUNNER = '''"""The note stage: writes its text beside the model it follows."""

from amber_trainer.stages import Output


def run(rt):
    out = rt.workdir / "output"
    out.mkdir(parents=True, exist_ok=True)
    (out / "note.txt").write_text(rt.run.stage.text)
    return Output(0, {"characters": len(rt.run.stage.text), "after": rt.run.model_from})
'''


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """A copy of `amber` and `amber_trainer` with the note stage added."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "amber", src / "amber")
    shutil.copytree(ROOT / "trainer" / "amber_trainer", src / "amber_trainer")
    stages = src / "amber" / "stages.py"
    text = stages.read_text()
    assert text.count("\nSTAGE_CLASSES = (\n") == 1 and text.count("    EvalStage,\n)") == 1
    text = text.replace("\nSTAGE_CLASSES = (\n", NOTE_STAGE + "\nSTAGE_CLASSES = (\n")
    stages.write_text(text.replace("    EvalStage,\n)", "    EvalStage,\n    NoteStage,\n)"))
    (src / "amber_trainer" / "stages" / "note.py").write_text(NOTE_RUNNER)
    return src


def amber(packages, *args):
    """`amber` from the copy (run outside the checkout, whose own `amber/` would come first)."""
    env = {**trainer_env(), "PYTHONPATH": str(packages)}
    return subprocess.run(
        [sys.executable, "-m", "amber", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=packages,
        timeout=600,
    )


def resource(tmp_path, note: dict) -> str:
    doc = yaml.safe_load((ROOT / "manifests/examples/amber-random.yaml").read_text())
    spec = doc["spec"]
    del spec["preset"], spec["overrides"]
    spec["storage"] = {"uri": str(tmp_path / "store")}
    spec["stages"] = [
        {"type": "score", "targetLayers": 6, "calibrationSamples": 4, "timesteps": [0.5]},
        {"type": "prune", "refitMlp": False},
        note,
    ]
    path = tmp_path / "note.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_a_new_stage_type_is_one_class_and_one_runner(packages, tmp_path):
    checked = amber(packages, "validate", resource(tmp_path, {"type": "note", "text": "hi"}))
    assert checked.returncode == 0, checked.stderr
    assert "note" in checked.stdout

    # Its fields are checked like any stage's, named in the message, nothing written.
    bad = amber(packages, "validate", resource(tmp_path, {"type": "note", "text": "x" * 201}))
    assert bad.returncode == 2
    assert "spec.stages[2].text" in bad.stderr + bad.stdout

    crd = amber(packages, "crd")
    assert crd.returncode == 0 and '"note"' in json.dumps(yaml.safe_load(crd.stdout))

    ran = amber(packages, "run", resource(tmp_path, {"type": "note", "text": "hello"}))
    assert ran.returncode == 0, ran.stderr[-3000:]
    store = open_store(str(tmp_path / "store" / "default" / "amber-random"))
    assert store.read_text("note/output/note.txt") == "hello"
    marker = json.loads(store.read_text("note/output/COMMIT.json"))
    assert marker["metrics"] == {"characters": 5, "after": "prune"}
    # The final model is the last model-making stage's, not the note's.
    assert json.loads(store.read_text("final/COMMIT.json"))["metrics"]["source"] == "prune"
