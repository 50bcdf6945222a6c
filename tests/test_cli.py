"""The `amber` command line, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent


def amber(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "amber", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_version():
    out = amber("version")
    assert out.returncode == 0 and out.stdout.strip() == "0.1.0"


def test_invalid_resource_names_the_field_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    doc = yaml.safe_load((ROOT / "manifests/examples/amber-random.yaml").read_text())
    doc["spec"]["overrides"]["fuse"]["singleLayers"] = 40
    bad.write_text(yaml.safe_dump(doc))
    out = amber("validate", str(bad))
    assert out.returncode == 2
    assert "spec.stages[3].singleLayers: 40 exceeds the student's 6 layers" in out.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed")
    out = amber("validate", str(broken))
    assert out.returncode == 2 and "not valid YAML" in out.stderr


def test_validate_prints_the_resolved_stages():
    out = amber("validate", str(ROOT / "manifests/examples/amber-random.yaml"), "-o", "json")
    assert out.returncode == 0
    stages = json.loads(out.stdout)
    assert [s["type"] for s in stages] == ["score", "prune", "finetune", "fuse", "eval"]
    assert stages[2]["steps"] == 80


def test_inspect_prints_the_10b_and_6b_arithmetic():
    out = amber("inspect", "--preset", "amber-6b", "--model", "qwen-image", "-o", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [round(r["parameters"] / 1e9, 1) for r in rows] == [20.4, 10.2, 6.2]
    table = amber("inspect")
    assert "20.43B" in table.stdout and "10.24B" in table.stdout and "6.16B" in table.stdout


def test_crd_command_emits_the_generated_crd():
    out = amber("crd")
    assert out.returncode == 0
    doc = yaml.safe_load(out.stdout)
    assert doc["kind"] == "CustomResourceDefinition"
    assert doc["metadata"]["name"] == "ambercompressions.amber.dev"


def test_exit_codes_are_listed_in_help_and_docs():
    from amber.errors import EXIT_CODES

    out = amber("--help")
    docs = (ROOT / "docs" / "resource.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} |" in docs, code
    assert "5 the run's folder is held by another run or the operator" in " ".join(
        out.stdout.split()
    )
