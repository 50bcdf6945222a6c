"""The layers stay apart: the planner, the types and storage load without torch or kopf, so
`amber validate`, `amber plan`'s planning and the operator's image need neither."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

LIGHT = ["amber.api", "amber.plan", "amber.storage", "amber.lineage", "amber.pipeline"]


@pytest.mark.parametrize("module", LIGHT)
def test_the_core_modules_import_neither_torch_nor_kopf(module):
    probe = (
        f"import sys, {module}; "
        "heavy = sorted({'torch', 'kopf', 'deepspeed', 'diffusers'} & set(sys.modules)); "
        "print(','.join(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{module} pulls in {done.stdout.strip()}"


def test_the_operator_never_imports_the_trainer():
    probe = (
        "import sys, amber_operator.reconcile, amber_operator.render; print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_the_trainers_libraries_never_import_a_stage_runner():
    # The runners (amber_trainer.stages) sit on top: they use the libraries, never the other
    # way round, so a library keeps working whatever the stages do.
    root = Path(__file__).parent.parent / "trainer" / "amber_trainer"
    found = []
    for package in ("model", "surgery", "train", "data", "costs", "quality"):
        for path in sorted((root / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                if any(n.startswith("amber_trainer.stages") for n in names):
                    found.append(f"{package}/{path.name}:{node.lineno}")
    assert not found, f"libraries importing a runner: {found}"
