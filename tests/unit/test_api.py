"""The API models, CLI validation messages and the generated CRD."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml

from invalid_pipelines import CASES, cel_holds, crd_errors

from kondense import cli, crd, generate
from kondense.api import CompressionPipeline, PipelineSpec, PipelineStatus
from kondense.errors import InvalidSpec
from kondense.plan import resolve
from kondense.validation import errors_of, load_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_are_valid(path):
    pipeline = load_file(path)
    assert pipeline.spec.stages


def demo_doc() -> dict:
    return yaml.safe_load((ROOT / "crds/examples/demo.yaml").read_text())


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["spec"]["stages"][3]["quantize"].update(bits=5), "spec.stages[3].quantize.bits: must be one of 4, 8"),
        (lambda d: d["spec"]["stages"][0]["distill"].update(temprature=2), "spec.stages[0].distill.temprature: unknown field"),
        (lambda d: d["spec"]["stages"][0]["distill"].update(alpha=1.5), "spec.stages[0].distill.alpha: must be <= 1"),
        (lambda d: d["spec"]["stages"][0]["distill"].update(method="magic"), "spec.stages[0].distill.method: must be one of logits, synthetic, gkd"),
        (lambda d: d["spec"]["stages"][2].update(distill={}), "spec.stages[2]: exactly one of distill, quantize, evaluate"),
        (lambda d: d["spec"]["stages"][2]["quantize"].update(type="q8_0"), "spec.stages[2].quantize.type: type is only for method gguf"),
        (lambda d: d["spec"].pop("storage"), "spec.storage: required field is missing"),
        (lambda d: d["spec"]["teacher"].update(uri="ftp://x"), "spec.teacher.uri: must be s3://bucket/key, file:///absolute/path"),
        (lambda d: d["spec"]["stages"][2].update({"from": "ghost"}), "spec.stages[2].from: 'ghost' names no stage"),
        (lambda d: d["spec"]["stages"][0].update(name="Bad_Name"), "spec.stages[0].name: 'Bad_Name' does not match"),
        (lambda d: d.update(kind="Pipeline"), "apiVersion/kind: expected kondense.io/v1alpha1 CompressionPipeline"),
    ],
    ids=["bits-enum", "unknown-field", "alpha-range", "method-enum", "two-kinds", "field-of-other-method",
         "missing-storage", "bad-uri", "unknown-from", "bad-name", "wrong-kind"],
)
def test_validation_messages_name_the_field(mutate, expected):
    doc = demo_doc()
    mutate(doc)
    errors = errors_of(doc)
    assert any(e.startswith(expected) for e in errors), errors


def test_load_file_reports_malformed_yaml_with_line(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("apiVersion: kondense.io/v1alpha1\nkind: CompressionPipeline\nspec: [unclosed\n")
    with pytest.raises(InvalidSpec, match=r"malformed YAML at line \d+"):
        load_file(bad)


def test_generated_files_are_up_to_date():
    stale = generate.stale(ROOT)
    assert not stale, f"run `kondense crd`: {stale} drifted from operator/kondense/api.py"


def walk(schema: dict, path: str = ""):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")


def test_crd_schema_is_structural_and_documented():
    schema = crd.openapi_schema()
    for path, node in walk(schema["properties"]["spec"], "spec"):
        if not path.endswith("[]"):  # list items are described by their list
            assert "description" in node, f"{path} has no description (kubectl explain)"
        assert "type" in node or "x-kubernetes-preserve-unknown-fields" in node, f"{path} has no type"
        for banned in ("anyOf", "$ref", "const", "title"):
            assert banned not in node, f"{path} has {banned}"
    assert schema["properties"]["status"]["properties"]["conditions"]["x-kubernetes-list-type"] == "map"


def test_crd_status_roundtrips_a_full_status():
    """Every field the operator writes is in the schema, so pruning keeps it."""
    status = PipelineStatus.model_validate(
        {
            "observedGeneration": 2,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "stage": "eval",
            "progress": "5/5",
            "stages": [{"name": "distill", "state": "Succeeded", "artifact": {"uri": "s3://b/x", "digest": "sha256:1", "sizeBytes": 3}, "metrics": {"loss": 1.0}}],
            "report": {"uri": "s3://b/r", "table": [{"variant": "distill", "sizeBytes": 3, "perplexity": 2.0}]},
        }
    ).dump()
    schema = crd.openapi_schema()["properties"]["status"]

    def keys_in(doc, node, path="status"):
        if isinstance(doc, dict):
            props = node.get("properties")
            if props is None:
                assert node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node, path
                return
            for k, v in doc.items():
                assert k in props, f"{path}.{k} would be pruned by the API server"
                keys_in(v, props[k], f"{path}.{k}")
        elif isinstance(doc, list):
            for item in doc:
                keys_in(item, node["items"], path + "[]")

    keys_in(status, schema)


def test_cel_rules_agree_with_python_validation():
    """The CRD's CEL rules, evaluated by cel-python, reject what `kondense validate` rejects."""
    pytest.importorskip("celpy")
    schema = crd.openapi_schema()["properties"]["spec"]
    rules = {r["rule"]: r for r in schema["x-kubernetes-validations"]}
    stage_rules = schema["properties"]["stages"]["items"]["x-kubernetes-validations"]
    quant_rules = schema["properties"]["stages"]["items"]["properties"]["quantize"]["x-kubernetes-validations"]

    def holds(rule: str, obj) -> bool:
        return cel_holds(rule, obj)

    doc = demo_doc()["spec"]
    assert all(holds(r, doc) for r in rules)
    dup = {**doc, "stages": doc["stages"] + [doc["stages"][0]]}
    assert not all(holds(r, dup) for r in rules)
    dangling = {**doc, "stages": doc["stages"] + [{"name": "x", "from": "ghost", "quantize": {"method": "gguf"}}]}
    assert not all(holds(r, dangling) for r in rules)
    assert all(holds(r["rule"], {"name": "a", "distill": {}}) for r in stage_rules)
    assert not all(holds(r["rule"], {"name": "a", "distill": {}, "quantize": {"method": "gguf"}}) for r in stage_rules)
    assert all(holds(r["rule"], {"method": "gguf", "type": "q8_0"}) for r in quant_rules)
    assert not all(holds(r["rule"], {"method": "gptq", "type": "q8_0"}) for r in quant_rules)


def test_pipeline_model_rejects_unknown_top_level_fields():
    doc = demo_doc()
    doc["spec"]["extra"] = 1
    with pytest.raises(ValueError):
        CompressionPipeline.model_validate(doc)


def test_stage_resources_have_no_schema_defaults_and_every_documented_default_is_explained():
    """The API server applies schema defaults on write: a default under a stage's `resources`
    would override the pipeline's value for every stage that sets any field there."""
    spec = crd.openapi_schema()["properties"]["spec"]["properties"]
    stage_resources = spec["stages"]["items"]["properties"]["resources"]

    def defaults(node, path=""):
        if isinstance(node, dict):
            found = [path] if "default" in node else []
            return found + [d for k, v in node.items() for d in defaults(v, f"{path}.{k}")]
        return [d for i, v in enumerate(node) for d in defaults(v, f"{path}[{i}]")] if isinstance(node, list) else []

    assert defaults(stage_resources) == []
    assert "Unset: spec.resources.gpus." in stage_resources["properties"]["gpus"]["description"]
    pipeline_gpus = spec["resources"]["properties"]["gpus"]
    assert pipeline_gpus["default"] == 1 and "Default: 1." in pipeline_gpus["description"]
    assert "Allowed: >= 0 and <= 16." in pipeline_gpus["description"]  # what `kubectl explain` can show


HF = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
RESERVED = "HOME, TMPDIR, HF_HOME and KONDENSE_* are set by kondense"


@pytest.mark.parametrize(
    "resources, expected",
    [
        ({"env": [{"name": "HOME", "value": "/"}]}, f"spec.resources.env[0].name: {RESERVED}"),
        ({"env": [{"name": "KONDENSE_CACHE", "value": "/"}]},
         f"spec.resources.env[0].name: {RESERVED}"),
        ({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]},
         f"spec.resources.env[0].name: {RESERVED}"),
        ({"env": [{**HF, "value": "x"}]}, "spec.resources.env[0]: value and valueFrom are exclusive"),
        ({"env": [{"name": "A", "valueFrom": {}}]},
         "spec.resources.env[0].valueFrom: exactly one of secretKeyRef, configMapKeyRef must be set"),
        ({"env": [HF, {"name": "A", "value": "1"},
                  {**HF, "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]},
         "spec.resources.env: names a variable twice: HF_TOKEN"),
        ({"envFrom": [{"secretRef": {"name": "s"}, "configMapRef": {"name": "c"}}]},
         "spec.resources.envFrom[0]: exactly one of secretRef, configMapRef must be set"),
        ({"affinity": {"nodeAfinity": {}}}, "spec.resources.affinity.nodeAfinity: unknown field"),
        ({"gpuResource": "mig-3g.40gb"}, "spec.resources.gpuResource: 'mig-3g.40gb' does not match"),
        ({"topologySpreadConstraints": [
            {"maxSkew": 0, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}]},
         "spec.resources.topologySpreadConstraints[0].maxSkew: must be >= 1"),
        ({"shmSize": "lots"}, "spec.resources.shmSize: 'lots' does not match"),
    ],
    ids=["reserved-home", "reserved-prefix", "storage-credentials", "value-and-valueFrom", "valueFrom-empty",
         "env-twice", "envFrom-both", "affinity-typo", "gpu-resource-unqualified", "max-skew", "shm-size"],
)
def test_pod_fields_are_checked_with_their_path(resources, expected):
    doc = demo_doc()
    doc["spec"]["resources"] = resources
    errors = errors_of(doc)
    assert any(e.startswith(expected) for e in errors), errors
    doc["spec"]["resources"] = {}
    doc["spec"]["stages"][1]["resources"] = resources  # the same checks on a stage's own resources
    stage_expected = expected.replace("spec.resources", "spec.stages[1].resources")
    assert any(e.startswith(stage_expected) for e in errors_of(doc)), errors_of(doc)


# -- one corpus of invalid pipelines for every layer (tests/invalid_pipelines.py) ---------------
ADMITTED = [c for c in CASES if c.api is None]
PLANNED = [c for c in CASES if c.planner]


def test_the_corpus_has_a_case_for_every_kind_of_rule():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    assert ADMITTED and PLANNED and len(CASES) > len(PLANNED)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kondense_validate_refuses_every_invalid_pipeline_naming_the_field(case, tmp_path, capsys):
    path = tmp_path / f"{case.id}.yaml"
    path.write_text(yaml.safe_dump(case.doc(), sort_keys=False))
    assert cli.main(["validate", str(path)]) == 1
    lines = [line.strip() for line in capsys.readouterr().err.splitlines()]
    assert any(line.startswith(f"{case.path}: ") and case.message in line for line in lines), lines


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_crd_refuses_what_the_fields_alone_decide(case):
    """The generated CRD's schema and CEL rules, evaluated here as the API server would
    (tests/cluster/test_admission.py sends the same corpus to a real one)."""
    pytest.importorskip("celpy")
    errors = crd_errors(case.doc())
    if case.api is None:
        assert errors == [], "needs effective resources: the planner decides, admission admits"
        return
    assert any(field == case.admission_path for field, _ in errors), errors
    cel_messages = {r["message"] for _, node in walk(crd.openapi_schema())
                    for r in node.get("x-kubernetes-validations", [])}
    if any(case.api in m for m in cel_messages):  # a CEL rule's own message, as the API server says it
        assert any(case.api in message for _, message in errors), errors


@pytest.mark.parametrize("case", PLANNED, ids=[c.id for c in PLANNED])
def test_the_planner_refuses_what_needs_other_stages_or_effective_resources(case):
    spec = PipelineSpec.model_validate(case.doc()["spec"])  # each object alone is valid
    with pytest.raises(InvalidSpec) as refused:
        resolve(spec, "ns", "demo")
    assert any(p.startswith(f"{case.path}: ") and case.message in p for p in str(refused.value).split("; ")), refused


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_the_crd_admits_the_examples(path):
    pytest.importorskip("celpy")
    assert crd_errors(yaml.safe_load(path.read_text())) == []


# -- quantize methods: compatibility in the descriptions, digests of stages made before the new fields ------


def test_quantize_method_description_says_where_each_output_loads_and_runs_fast():
    from kondense.api import QuantizeSpec

    text = QuantizeSpec.model_fields["method"].description
    for method in typing.get_args(QuantizeSpec.model_fields["method"].annotation):
        assert f"{method}:" in text or f"{method} /" in text or f"/ {method}:" in text, method
    for words in ("vLLM", "transformers", "llama.cpp", "Ada/Hopper", "needs a GPU to quantize", "no calibration data"):
        assert words in text, words
    assert "4 and 8 bits" in QuantizeSpec.model_fields["bits"].description
    for name in QuantizeSpec.DEFAULT_IGNORE:
        assert name in QuantizeSpec.model_fields["ignore"].description


def test_new_quantize_fields_unset_leave_a_gptq_stage_digest_as_before():
    from kondense.api import QuantizeSpec, Resources, Stage
    from kondense.plan import _identity

    def identity(**fields):
        stage = Stage(name="gptq", quantize=QuantizeSpec(method="gptq", bits=4, **fields))
        return _identity(stage, Resources())

    before = {"method", "bits", "groupSize", "calibrationSamples", "calibrationSeqLength", "doubleQuant", "computeDtype", "type"}
    assert set(identity()) == before
    assert identity(actorder="none")["actorder"] == "none"
    assert identity(ignore=["lm_head"])["ignore"] == ["lm_head"]
