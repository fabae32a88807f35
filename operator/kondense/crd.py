"""The CustomResourceDefinition, generated from the pydantic models in api.py.

Pydantic emits JSON Schema 2020-12; the API server wants a structural OpenAPI v3.0 schema:
references inlined, no `anyOf` with null, `exclusiveMinimum` as a boolean, `const` as a
one-value enum, free-form maps marked with x-kubernetes-preserve-unknown-fields.
"""

from __future__ import annotations

from typing import Any

import yaml

from kondense import api

DROP = {"title", "$defs", "discriminator"}
# On a field whose value overrides another (a stage's `resources` over spec.resources): the
# API server must store only what the user wrote, so no default of the model below it applies.
INHERITS = "x-kondense-inherits"


def inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """A JSON schema with every `$ref` replaced by its definition (shared with chart.py)."""
    if isinstance(node, list):
        return [inline_refs(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = inline_refs(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        # Keep the referring field's own description/default over the model's docstring.
        return {**target, **{k: inline_refs(v, defs) for k, v in node.items() if k != "$ref"}}
    return {k: inline_refs(v, defs) for k, v in node.items()}


def _without_defaults(node: Any, source: str) -> Any:
    """`node` with no `default` anywhere; each property says where its value comes from instead."""
    if isinstance(node, list):
        return [_without_defaults(x, source) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _without_defaults(v, source) for k, v in node.items() if k != "default"}
    for name, prop in (node.get("properties") or {}).items():
        prop["description"] = f"{prop.get('description', '').rstrip()} Unset: {source}.{name}.".lstrip()
    return node


def _documented(node: dict) -> dict:
    """A leaf's default and bounds in its description too: `kubectl explain` shows only that."""
    notes = []
    if "default" in node and node["default"] not in ({}, []) and "Default" not in node.get("description", ""):
        notes.append(f"Default: {yaml.safe_dump(node['default'], default_flow_style=True).strip().removesuffix('...').strip()}.")
    low, high = node.get("minimum"), node.get("maximum")
    if low is not None or high is not None:
        low_op = ">" if node.get("exclusiveMinimum") is True else ">="
        high_op = "<" if node.get("exclusiveMaximum") is True else "<="
        bounds = [f"{low_op} {low}" if low is not None else "", f"{high_op} {high}" if high is not None else ""]
        notes.append("Allowed: " + " and ".join(b for b in bounds if b) + ".")
    if notes:
        node["description"] = " ".join([node.get("description", "").rstrip(), *notes]).strip()
    return node


def _structural(node: Any) -> Any:
    if isinstance(node, list):
        return [_structural(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: v for k, v in node.items() if k not in DROP}
    if source := node.pop(INHERITS, None):
        node = _without_defaults(node, source)
    if "anyOf" in node:  # Optional[X] -> X
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) == 1:
            merged = {k: v for k, v in {**options[0], **node}.items() if k not in DROP}
            if merged.get("default", 0) is None:
                merged.pop("default")
            node = merged
        else:
            node["anyOf"] = options
    if "const" in node:
        node["enum"] = [node.pop("const")]
        node.setdefault("type", "string")
    if "enum" in node and "type" not in node:
        node["type"] = "integer" if all(isinstance(v, int) for v in node["enum"]) else "string"
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[plain] = node.pop(bound)
            node[bound] = True
    if node.get("default", 0) is None:
        node.pop("default")
    if node.get("type") == "object" and "properties" not in node:
        extra = node.get("additionalProperties")
        if extra in (None, True, {}):
            node.pop("additionalProperties", None)
            node["x-kubernetes-preserve-unknown-fields"] = True
    if "properties" in node:
        node.pop("additionalProperties", None)  # extra="forbid": pruning and strict decoding reject unknowns
        node["type"] = "object"
    if node.get("type") in ("integer", "number", "string", "boolean"):
        node = _documented(node)
    return {k: _structural(v) for k, v in node.items()}


def schema_of(model: type[api.Model]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(inline_refs(raw, raw.get("$defs", {})))


def openapi_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "Distils a teacher LLM into a student, quantizes it and evaluates the variants, "
        "each stage as a Kubernetes Job with its checkpoints staged in object storage.",
        "required": ["spec"],
        "x-kubernetes-validations": api.NAME_RULES,
        "properties": {
            "apiVersion": {"type": "string", "description": "kondense.io/v1alpha1"},
            "kind": {"type": "string", "description": "CompressionPipeline"},
            "metadata": {"type": "object"},
            "spec": schema_of(api.PipelineSpec),
            "status": schema_of(api.PipelineStatus),
        },
    }


def ready(field: str) -> str:
    return f'.status.conditions[?(@.type=="Ready")].{field}'


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "kondense", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["kondense", "ml"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Stage", "type": "string", "jsonPath": ".status.stage", "description": "Current stage"},
                        {"name": "Progress", "type": "string", "jsonPath": ".status.progress", "description": "Stages done"},
                        {"name": "Ready", "type": "string", "jsonPath": ready("status"), "description": "Ready condition"},
                        {"name": "Reason", "type": "string", "jsonPath": ready("reason"), "description": "Why"},
                        {"name": "Best", "type": "string", "jsonPath": ".status.report.best", "priority": 1,
                         "description": "Smallest variant that passed its quality gates"},
                        {"name": "Size", "type": "number", "jsonPath": ".status.report.bestSizeRatio", "priority": 1,
                         "description": "The best variant's size over the teacher's"},
                        {"name": "Gates", "type": "string", "priority": 1,
                         "jsonPath": '.status.conditions[?(@.type=="QualityGatePassed")].status',
                         "description": "Quality gates passed"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = "# Generated by `kondense crd` from operator/kondense/api.py. Do not edit.\n"


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120)
