"""The resource types: presets, validation messages that name the field, the generated CRD."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from amber import presets
from amber.api import AmberCompressionSpec
from amber.resource import InvalidResource, load, parse
from amber.schema import crd

EXAMPLES = sorted((Path(__file__).parent.parent / "manifests" / "examples").glob("*.yaml"))
TINY = {
    "apiVersion": "amber.dev/v1alpha1",
    "kind": "AmberCompression",
    "metadata": {"name": "t"},
    "spec": {
        "teacher": {"config": {"num_layers": 12}},
        "data": {"synthetic": {}},
        "storage": {"uri": "./store"},
        "preset": "amber-6b",
    },
}


def with_spec(**changes):
    doc = copy.deepcopy(TINY)
    doc["spec"].update(changes)
    return doc


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path):
    obj = load(path)
    # raw pairs (data.uri) are encoded first; the tiny example trains on synthetic data
    first = "encode" if obj.spec.data.uri else "score"
    assert obj.spec.pipeline()[0].type == first


@pytest.mark.parametrize(
    ("layers", "student", "single"), [(60, 30, 27), (12, 6, 5), (24, 12, 11), (4, 2, 2)]
)
def test_presets_scale_with_the_teacher(layers, student, single):
    stages = {s.name: s for s in presets.build("amber-6b", layers, {})}
    assert stages["score"].target_layers == student
    assert stages["fuse"].single_layers == single  # 90% of the student
    assert stages["fuse"].text_rank_fraction == 0.5
    assert [s.name for s in presets.build("amber-10b", layers, {})] == [
        "score",
        "prune",
        "finetune",
        "eval",
    ]


def test_overrides_change_only_the_named_stage():
    obj = parse(with_spec(overrides={"finetune": {"steps": 7, "ema": 0.0}}))
    stages = {s.name: s for s in obj.spec.pipeline()}
    assert (stages["finetune"].steps, stages["finetune"].ema) == (7, 0.0)
    assert stages["fuse"].steps == 4000


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            with_spec(overrides={"fuse": {"singleLayers": 9}}),
            "spec.stages[3].singleLayers: 9 exceeds",
        ),
        (with_spec(overrides={"nope": {}}), "spec.overrides: no stage named nope"),
        (with_spec(overrides={"finetune": {"steps": 0}}), "spec.overrides.finetune.steps"),
        (with_spec(overrides={"finetune": {"stepz": 1}}), "spec.overrides.finetune.stepz: Extra"),
        (with_spec(overrides={"distill": {}}), "spec.overrides: no stage named distill"),
        (
            with_spec(
                preset=None, stages=[{"type": "score", "targetLayers": 12}, {"type": "prune"}]
            ),
            "spec.stages[0].targetLayers: 12 is not below the teacher's 12 layers",
        ),
        (
            with_spec(preset=None, stages=[{"type": "prune", "init": "mean"}]),
            "spec.stages[0].init: Input should be",
        ),
        (with_spec(preset=None, stages=[{"type": "distill"}]), "distill needs a prune stage"),
        (
            with_spec(
                preset=None,
                stages=[{"type": "score", "targetLayers": 4}, {"type": "prune"}, {"type": "prune"}],
            ),
            "spec.stages[2].name: 'prune' is used by an earlier stage",
        ),
        (with_spec(stages=[]), "exactly one of preset and stages"),
        (with_spec(storage={"uri": "gs://b"}), "spec.storage.uri"),
        (with_spec(scheduling={"gang": "kueue"}), "queueName is required"),
        (with_spec(teacher={"uri": "s3://m", "config": {}}), "spec.teacher: exactly one of"),
        (with_spec(resources={"gpusPerPod": -1}), "spec.resources.gpusPerPod"),
        (with_spec(suspend="maybe"), "spec.suspend"),
        (with_spec(storage={"uri": "s", "accessKey": "inline"}), "spec.storage.accessKey: Extra"),
    ],
)
def test_invalid_specs_name_the_field(doc, message):
    with pytest.raises(InvalidResource) as err:
        parse(doc)
    assert message in str(err.value)


def test_teacher_depth_comes_from_its_config_or_defaults_to_qwen_image():
    assert parse(TINY).spec.teacher.num_layers == 12
    uri = parse(with_spec(teacher={"uri": "s3://models/qwen-image"}))
    assert uri.spec.teacher.num_layers == 60
    assert {s.name: s for s in uri.spec.pipeline()}["score"].target_layers == 30


def test_camel_case_round_trip():
    spec = parse(TINY).spec
    dumped = spec.dump()
    assert "failurePolicy" in dumped and "maxRestarts" in dumped["failurePolicy"]
    assert AmberCompressionSpec.model_validate(dumped) == spec


def structural_problems(node, path="spec"):
    """What Kubernetes' structural-schema check would reject."""
    problems = []
    if isinstance(node, dict):
        for bad in ("$ref", "anyOf", "oneOf", "allOf", "const", "title", "$defs"):
            if bad in node:
                problems.append(f"{path}: {bad}")
        if ("properties" in node or "items" in node) and "type" not in node:
            problems.append(f"{path}: no type")
        for key, value in node.items():
            if key == "properties":
                for name, sub in value.items():
                    problems += structural_problems(sub, f"{path}.{name}")
            elif key in ("items", "additionalProperties") and isinstance(value, dict):
                problems += structural_problems(value, f"{path}[]")
    return problems


def test_crd_is_generated_and_structural():
    doc = crd()
    version = doc["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert structural_problems(schema) == []
    assert doc["spec"]["names"]["shortNames"] == ["amc"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Stage",
        "Progress",
        "ETA",
        "Restarts",
        "Age",
    ]
    assert version["subresources"] == {"status": {}}
    stage = schema["properties"]["stages"]["items"]
    assert stage["properties"]["type"]["enum"][:3] == ["encode", "score", "prune"]
    rules = {r["message"]: r["rule"] for r in stage["x-kubernetes-validations"]}
    assert (
        rules["init only applies to stage types: prune"]
        == "!has(self.init) || self.type in ['prune']"
    )
    assert "targetLayers is required for stage type score" in rules
    # The teacher config is typed: the apiserver checks its keys and their types.
    config = schema["properties"]["teacher"]["properties"]["config"]
    assert "x-kubernetes-preserve-unknown-fields" not in config
    assert config["properties"]["num_layers"] == {
        "type": "integer",
        "minimum": 2,
        "maximum": 512,
        "description": "num_layers: dual-stream blocks (Qwen-Image: 60).",
    }
    assert config["properties"]["axes_dims_rope"]["maxItems"] == 3
    # The secret is referenced, never inlined.
    assert set(
        schema["properties"]["storage"]["properties"]["credentialsSecret"]["properties"]
    ) == {
        "name",
        "accessKeyIdKey",
        "secretAccessKeyKey",
    }
    yaml.safe_dump(doc)  # serialisable as a manifest
    assert json.loads(json.dumps(doc)) == doc
