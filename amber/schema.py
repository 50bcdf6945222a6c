"""The CRD, generated from the pydantic models in `amber.api` (never written by hand).

Kubernetes wants a *structural* OpenAPI v3.0 schema: no `$ref`, a `type` on every node, no
types inside `anyOf`/`oneOf`, free-form objects marked `x-kubernetes-preserve-unknown-fields`.
`structural()` rewrites pydantic's JSON Schema into that form. The stage list is a
discriminated union; it becomes one object with the union of all stage fields, plus generated
CEL rules that reject a field on a stage type that does not have it, so `kubectl apply`
reports `init only applies to stage types: prune` just as `amber run` would.
"""

from __future__ import annotations

from typing import Any

from amber.api import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAME,
    VERSION,
    AmberCompressionSpec,
    AmberCompressionStatus,
)

DROP = {"title", "default", "discriminator", "examples"}

# Cross-field rules the apiserver can check itself (CEL); the rest run in the operator and in
# `amber run` through the same pydantic models, before any Job exists.
SPEC_RULES = [
    {
        "rule": "has(self.preset) != has(self.stages)",
        "message": "exactly one of spec.preset and spec.stages must be set",
    },
    {
        "rule": "!has(self.overrides) || size(self.overrides) == 0 || has(self.preset)",
        "message": "spec.overrides only applies to a preset",
    },
    {
        "rule": "!has(self.stages) || self.stages.all(s, s.type != 'score' || "
        "!has(self.teacher.numLayers) || s.targetLayers < self.teacher.numLayers)",
        "message": "spec.stages[].targetLayers must be below spec.teacher.numLayers",
    },
]
TEACHER_RULES = [
    {"rule": "has(self.uri) != has(self.config)", "message": "exactly one of uri and config"}
]
SCHEDULING_RULES = [
    {
        "rule": "self.gang != 'kueue' || has(self.queueName)",
        "message": "queueName is required when gang is kueue",
    }
]
RULES = {"spec": SPEC_RULES, "teacher": TEACHER_RULES, "scheduling": SCHEDULING_RULES}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].split("/")[-1]]
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return _resolve({**target, **rest}, defs)
        return {k: _resolve(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _variant_type(variant: dict[str, Any]) -> str:
    prop = variant["properties"]["type"]
    return prop.get("const") or prop["enum"][0]


def _merge_union(variants: list[dict[str, Any]]) -> dict[str, Any]:
    """One object schema for a discriminated union on `type`, with CEL per-type rules."""
    fields: dict[str, dict[str, Any]] = {}  # field -> stage type -> its schema there
    types = []
    for variant in variants:
        kind = _variant_type(variant)
        types.append(kind)
        for name, prop in variant["properties"].items():
            fields.setdefault(name, {})[kind] = prop
    properties = {"type": {"type": "string", "enum": types, "description": "type: the stage."}}
    rules = []
    for name, by_kind in fields.items():
        if name == "type":
            continue
        properties[name], own = _shared_field(name, by_kind)
        rules += own
        if len(by_kind) < len(types):
            rules.append(
                {
                    "rule": f"!has(self.{name}) || self.type in {list(by_kind)!r}",
                    "message": f"{name} only applies to stage types: {', '.join(by_kind)}",
                }
            )
    for variant in variants:
        kind = _variant_type(variant)
        for name in variant.get("required", []):
            rules.append(
                {
                    "rule": f"self.type != '{kind}' || has(self.{name})",
                    "message": f"{name} is required for stage type {kind}",
                }
            )
    return {
        "type": "object",
        "properties": properties,
        "required": ["type"],
        "x-kubernetes-validations": rules,
    }


def _shared_field(name: str, by_kind: dict[str, dict[str, Any]]) -> tuple[dict, list[dict]]:
    """One schema for a field that several stage types have, and the CEL rules it needs.

    Where the types allow different values (score's `mode` is one-shot or iterative,
    distill's local or global), the schema allows any of them and a rule per type keeps each
    to its own; any other difference is a model the CRD cannot express, refused here."""
    ignored = DROP | {"description", "enum"}
    shape = [{k: v for k, v in prop.items() if k not in ignored} for prop in by_kind.values()]
    enums = {kind: prop.get("enum") for kind, prop in by_kind.items()}
    first = next(iter(by_kind.values()))
    if len({repr(e) for e in enums.values()}) == 1 and all(x == shape[0] for x in shape):
        return first, []
    if any(x != shape[0] for x in shape) or None in enums.values():
        raise ValueError(f"stage field {name} has schemas the CRD cannot merge: {by_kind}")
    allowed = list(dict.fromkeys(v for values in enums.values() for v in values))
    descriptions = dict.fromkeys(p["description"] for p in by_kind.values() if "description" in p)
    merged = {**first, "enum": allowed}
    if descriptions:
        merged["description"] = " ".join(descriptions)
    rules = [
        {
            "rule": f"self.type != '{kind}' || !has(self.{name}) || self.{name} in {values!r}",
            "message": f"{name} of a {kind} stage is one of: {', '.join(values)}",
        }
        for kind, values in enums.items()
    ]
    return merged, rules


def structural(node: Any, name: str = "") -> Any:
    """Rewrite a resolved JSON Schema node into a structural OpenAPI v3.0 schema."""
    if not isinstance(node, dict):
        return node
    if "oneOf" in node and all("properties" in v for v in node["oneOf"]):
        merged = _merge_union(node["oneOf"])
        merged["properties"] = {k: structural(v, k) for k, v in merged["properties"].items()}
        return merged
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        base = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            # Optional fields are omitted in Kubernetes objects, so null is never needed.
            return structural({**options[0], **base}, name)
        raise ValueError(f"{name}: unions of several types cannot be structural: {node}")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROP:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out["properties"] = {k: structural(v, k) for k, v in value.items()}
        elif key == "items":
            out["items"] = structural(value, name)
        elif key == "additionalProperties":
            if isinstance(value, dict) and value:
                out["additionalProperties"] = structural(value, name)
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string" if all(isinstance(v, str) for v in out["enum"]) else "integer"
    if (
        out.get("type") == "object"
        and not out.get("properties")
        and not out.get("additionalProperties")
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    if name in RULES:
        out["x-kubernetes-validations"] = RULES[name]
    return out


def spec_schema() -> dict[str, Any]:
    raw = AmberCompressionSpec.model_json_schema(by_alias=True, mode="validation")
    return structural(_resolve(raw, raw.get("$defs", {})), "spec")


def status_schema() -> dict[str, Any]:
    raw = AmberCompressionStatus.model_json_schema(by_alias=True, mode="serialization")
    return structural(_resolve(raw, raw.get("$defs", {})), "status")


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition for AmberCompression."""
    column = lambda name, path, kind="string", priority=0: {  # noqa: E731
        "name": name,
        "type": kind,
        "jsonPath": path,
        **({"priority": priority} if priority else {}),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": ["amber"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        column("Phase", ".status.phase"),
                        column("Stage", ".status.currentStage"),
                        column("Progress", ".status.progress"),
                        column("ETA", ".status.eta"),
                        column("Restarts", ".status.restarts", "integer"),
                        column("Age", ".metadata.creationTimestamp", "date"),
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": f"{KIND} ({API_VERSION}) compresses one teacher.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }
