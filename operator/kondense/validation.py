"""Parse and check a CompressionPipeline the way the API server and the planner would.

Every message names its field path in the wire form, e.g.
`spec.stages[2].quantize.bits: must be one of 4, 8`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kondense.api import API_VERSION, KIND, CompressionPipeline, RuleError
from kondense.errors import InvalidSpec
from kondense.plan import semantic_errors


def field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("function-", "literal[")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def describe(error: dict[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "extra_forbidden":
        return "unknown field (not part of the CompressionPipeline schema)"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        expected = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
        return f"must be one of {expected}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound} (got {error.get('input')!r})"
    if kind == "string_pattern_mismatch":
        return f"{error.get('input')!r} does not match {ctx.get('pattern')}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return error["msg"]


def format_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for e in exc.errors():
        path = field_path(tuple(e["loc"]))
        if isinstance(error := e.get("ctx", {}).get("error"), RuleError):
            path += error.field  # the field below the object that the rule is about
        path = f"{prefix}.{path}" if prefix and path else prefix or path
        lines.append(f"{path}: {describe(e)}")
    return lines


def errors_of(doc: Any) -> list[str]:
    """Every problem of a parsed document, schema first, then references between stages."""
    return _checked(doc)[1]


def parse(doc: Any) -> CompressionPipeline:
    pipeline, problems = _checked(doc)
    if problems or pipeline is None:
        raise InvalidSpec("\n".join(problems))
    return pipeline


def _checked(doc: Any) -> tuple[CompressionPipeline | None, list[str]]:
    """The pipeline (validated once) and its problems."""
    if not isinstance(doc, dict):
        return None, ["the document must be a YAML mapping (a CompressionPipeline)"]
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != KIND:
        return None, [f"apiVersion/kind: expected {API_VERSION} {KIND}, got {doc.get('apiVersion')} {doc.get('kind')}"]
    try:
        pipeline = CompressionPipeline.model_validate(doc)
    except ValidationError as e:
        return None, format_errors(e)
    return pipeline, semantic_errors(pipeline.spec)


def load_file(path: Path) -> CompressionPipeline:
    """Read one CompressionPipeline from a YAML file; InvalidSpec lists every problem."""
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidSpec(f"{path}: {e.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InvalidSpec(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if len(docs) != 1:
        raise InvalidSpec(f"{path}: expected one CompressionPipeline document, found {len(docs)}")
    try:
        return parse(docs[0])
    except InvalidSpec as e:
        raise InvalidSpec(f"{path}:\n" + "\n".join(f"  {line}" for line in str(e).splitlines())) from None
