"""The layers stay apart: the planner, the types and storage load without torch or kopf, so
`amber validate`, `amber plan`'s planning and the operator's image need neither."""

from __future__ import annotations

import subprocess
import sys

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
