"""values.yaml (hand-written) and the values model in kondense.chart agree key for key."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kondense import chart

CHART = Path(__file__).resolve().parents[2] / "charts" / "kondense"
VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
SCHEMA = chart.schema()


def model_paths(schema: dict[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every key path the model declares (free-form maps such as podLabels are leaves)."""
    out = set()
    for key, sub in schema.get("properties", {}).items():
        out.add(prefix + (key,))
        out |= model_paths(sub, prefix + (key,))
    return out


def yaml_paths(
    values: dict[str, Any], schema: dict[str, Any], prefix: tuple[str, ...] = ()
) -> set[tuple[str, ...]]:
    """Every key path in values.yaml, descending only where the model has named properties."""
    out = set()
    for key, value in values.items():
        out.add(prefix + (key,))
        sub = schema.get("properties", {}).get(key, {})
        if isinstance(value, dict) and "properties" in sub:
            out |= yaml_paths(value, sub, prefix + (key,))
    return out


def test_schema_is_valid_draft7():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert "$ref" not in json.dumps(SCHEMA) and "$defs" not in json.dumps(SCHEMA)
    assert chart.values_schema().endswith("}\n")


def test_values_yaml_passes_the_schema():
    jsonschema.Draft7Validator(SCHEMA).validate(VALUES)


def test_values_yaml_has_exactly_the_model_keys():
    in_yaml, in_model = yaml_paths(VALUES, SCHEMA), model_paths(SCHEMA)
    assert not in_yaml - in_model, f"in values.yaml, not in kondense.chart: {sorted(in_yaml - in_model)}"
    assert not in_model - in_yaml, f"in kondense.chart, not in values.yaml: {sorted(in_model - in_yaml)}"


def test_values_yaml_holds_the_model_defaults():
    assert VALUES == chart.defaults()


def test_every_model_key_has_a_description():
    def walk(schema: dict[str, Any], where: str) -> list[str]:
        missing = []
        for key, sub in schema.get("properties", {}).items():
            if not sub.get("description"):
                missing.append(f"{where}{key}")
            missing += walk(sub, f"{where}{key}.")
        for sub in (schema.get("items"),):
            if isinstance(sub, dict):
                missing += walk(sub, f"{where}[].")
        return missing

    assert not walk(SCHEMA, "")


def test_every_key_in_values_yaml_has_a_comment():
    """Each model key's line is directly below a comment line."""
    keys = model_paths(SCHEMA)
    stack: list[tuple[int, str]] = []
    previous = ""
    uncommented = []
    for line in VALUES_TEXT.splitlines():
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if match:
            indent, key = len(match.group(1)), match.group(2)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, key))
            path = tuple(k for _, k in stack)
            if path in keys and not previous.lstrip().startswith("#"):
                uncommented.append(".".join(path))
        if line.strip():
            previous = line
    assert not uncommented, f"keys without a comment above them in values.yaml: {uncommented}"


@pytest.mark.parametrize(
    "patch",
    [
        pytest.param({"operator": {"logLevel": "LOUD"}}, id="enum"),
        pytest.param({"operator": {"replicas": 0}}, id="minimum"),
        pytest.param({"jobs": {"image": {"tag": "latest"}}}, id="latest-tag"),
        pytest.param({"watchNamespaces": ["Bad_Name"]}, id="namespace-pattern"),
        pytest.param({"rbac": {"create": "yes"}}, id="type"),
        pytest.param({"typo": 1}, id="unknown-top-level"),
        pytest.param({"crds": {"enable": True}}, id="unknown-nested"),
    ],
)
def test_schema_rejects(patch):
    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in over.items()}}
        return over

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(SCHEMA).validate(merge(VALUES, patch))
