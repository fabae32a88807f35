"""Invalid pipelines, one per kind of rule, for every layer that refuses them.

Each case changes the demo example (crds/examples/demo.yaml) in one place. Three layers decide:
`kondense validate` (the pydantic models, then plan.semantic_errors), the API server (the CRD's
schema and CEL rules, tests/cluster/test_admission.py) and the planner (plan.resolve, what the
operator runs before it creates a Job). Every layer that can decide a case refuses it with a
message naming the field. Only the rules that need a stage's effective resources (spec.resources
with the stage's own laid over it) are left to the planner: the API server admits those cases.

`crd_errors` checks a document against the generated CRD without a cluster: its structural
schema with jsonschema (OpenAPI's draft 4 semantics), its CEL rules with cel-python, schema
defaults applied first as the API server does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "crds" / "examples" / "demo.yaml"
# The demo's stages by index.
DISTILL, CE_ONLY, NF4, GPTQ, GGUF, EVAL = range(6)


def valid() -> dict:
    """The demo pipeline: valid for every layer."""
    return yaml.safe_load(DEMO.read_text())


@dataclass(frozen=True)
class Case:
    id: str
    change: Callable[[dict], Any]  # changes a valid() document in place
    path: str  # the field kondense names
    message: str  # what kondense says about it
    api: str | None  # what the API server says; None: admission cannot decide (effective resources)
    api_path: str | None = None  # the field the API server names, when it differs from `path`
    planner: bool = False  # plan.resolve refuses it too (a spec that the models accept)

    def doc(self) -> dict:
        doc = valid()
        self.change(doc)
        return doc

    @property
    def admission_path(self) -> str:
        return self.api_path if self.api_path is not None else self.path


def stage(i: int) -> Callable[[dict], dict]:
    return lambda doc: doc["spec"]["stages"][i]


def setter(where: Callable[[dict], dict], **fields: Any) -> Callable[[dict], None]:
    return lambda doc: where(doc).update(copy.deepcopy(fields))


def spec(key: str) -> Callable[[dict], dict]:
    return lambda doc: doc["spec"][key]


def distill(doc: dict) -> dict:
    return doc["spec"]["stages"][DISTILL]["distill"]


def evaluate(doc: dict) -> dict:
    return doc["spec"]["stages"][EVAL]["evaluate"]


def resources(doc: dict) -> dict:
    return doc["spec"]["resources"]


def append_stage(**stage_doc: Any) -> Callable[[dict], None]:
    return lambda doc: doc["spec"]["stages"].append(copy.deepcopy(stage_doc))


def both(*changes: Callable[[dict], Any]) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        for c in changes:
            c(doc)

    return change


S = "spec.stages"
URI = "must be s3://bucket/key, file:///absolute/path, pvc://claim/path or hf://org/name"
S3 = "an s3:// URI names a bucket (3-63 lowercase letters, digits, . and -) and a key"
DOTS = "must not contain . or .. path segments"
RESERVED = "HOME, TMPDIR, HF_HOME and KONDENSE_* are set by kondense"
STAGE_FROM = "a stage's `from` must name an earlier stage, teacher or student"
TEACHER_LOGITS_REF = "distill.teacherLogits must name an earlier teacherLogits stage"

CASES = [
    # Numbers: bounds in the schema (minimum/maximum), the same bounds in pydantic (ge/gt/le/lt).
    Case("max-steps-negative", setter(distill, maxSteps=-5), f"{S}[0].distill.maxSteps", "must be >= 1",
         "should be greater than or equal to 1"),
    Case("learning-rate-zero", setter(distill, learningRate=0), f"{S}[0].distill.learningRate", "must be > 0",
         "should be greater than 0"),
    Case("warmup-ratio-one", setter(distill, warmupRatio=1), f"{S}[0].distill.warmupRatio", "must be < 1",
         "should be less than 1"),
    Case("eval-split-zero", setter(spec("dataset"), evalSplit=0), "spec.dataset.evalSplit", "must be > 0",
         "should be greater than 0"),
    Case("seed-beyond-32-bit", setter(distill, seed=2**31), f"{S}[0].distill.seed", "must be <= 2147483647",
         "should be less than or equal to 2147483647"),
    Case("gpus-too-many", setter(resources, gpus=17), "spec.resources.gpus", "must be <= 16",
         "should be less than or equal to 16"),
    Case("gpu-memory-zero", setter(stage(GPTQ), resources={"gpuMemoryGiB": 0}),
         f"{S}[3].resources.gpuMemoryGiB", "must be > 0", "should be greater than 0"),
    # Enums: closed in the schema and in pydantic (Literal).
    Case("bits-enum", setter(lambda d: d["spec"]["stages"][GPTQ]["quantize"], bits=5), f"{S}[3].quantize.bits",
         "must be one of 4, 8", "Unsupported value: 5"),
    Case("precision-enum", setter(distill, precision="fp8"), f"{S}[0].distill.precision",
         "must be one of auto, fp32, bf16, fp16", 'Unsupported value: "fp8"'),
    # URIs: CEL rules on the field, the same regular expressions in Python (api.matching).
    Case("uri-scheme", setter(spec("teacher"), uri="ftp://models/teacher"), "spec.teacher.uri", URI, URI),
    Case("s3-without-bucket", setter(spec("teacher"), uri="s3:///model"), "spec.teacher.uri", S3, S3),
    Case("s3-without-key", setter(spec("teacher"), uri="s3://models"), "spec.teacher.uri", S3, S3),
    Case("s3-dot-dot", setter(spec("student"), uri="s3://bucket/../../etc/passwd"), "spec.student.uri",
         DOTS, DOTS),
    Case("query-in-uri", setter(spec("teacher"), uri="s3://models/teacher?versionId=3"), "spec.teacher.uri",
         "must not contain ? or #", "must not contain ? or #"),
    Case("file-relative", setter(spec("dataset"), uri="file://data/prompts.jsonl"), "spec.dataset.uri",
         "a file:// URI holds an absolute path", "a file:// URI holds an absolute path"),
    Case("pvc-claim-name", setter(spec("teacher"), uri="pvc://Models_1/teacher"), "spec.teacher.uri",
         "a pvc:// URI names a PersistentVolumeClaim", "a pvc:// URI names a PersistentVolumeClaim"),
    Case("hf-repository", setter(spec("student"), uri="hf://org/name/extra"), "spec.student.uri",
         "an hf:// URI names a Hub repository", "an hf:// URI names a Hub repository"),
    Case("storage-scheme", setter(spec("storage"), uri="pvc://artifacts/runs"), "spec.storage.uri",
         "must be s3://bucket/prefix or file:///absolute/path", "must be s3://bucket/prefix or file:///absolute/path"),
    Case("storage-dot", setter(spec("storage"), uri="file:///srv/./kondense"), "spec.storage.uri", DOTS, DOTS),
    Case("revision-without-hf", setter(spec("teacher"), revision="main"), "spec.teacher.revision",
         "revision is only for hf:// URIs", "revision is only for hf:// URIs"),
    # Names and endpoints: patterns in the schema and in pydantic.
    Case("credentials-secret-name", setter(spec("storage"), credentialsSecret="S3_Credentials"),
         "spec.storage.credentialsSecret", "does not match", "should match"),
    Case("endpoint-without-scheme", setter(spec("storage"), endpoint="minio:9000"), "spec.storage.endpoint",
         "does not match", "should match"),
    Case("pipeline-name-too-long", lambda d: d["metadata"].update(name="p" * 41), "metadata.name",
         "at most 40 characters", "metadata.name must be at most 40",
         api_path=""),  # a rule at the root has no fieldPath: its message names the field
    # Fields of one object together: api.Rule, CEL in the CRD and the same test in Python.
    Case("global-batch", setter(distill, globalBatchSize=12), f"{S}[0].distill.globalBatchSize",
         "globalBatchSize must be a multiple of batchSize", "globalBatchSize must be a multiple of batchSize"),
    Case("group-size-zero", setter(lambda d: d["spec"]["stages"][GPTQ]["quantize"], groupSize=0),
         f"{S}[3].quantize.groupSize", "groupSize must be -1", "groupSize must be -1"),
    Case("field-of-another-method", setter(lambda d: d["spec"]["stages"][NF4]["quantize"], type="q8_0"),
         f"{S}[2].quantize.type", "type is only for method gguf", "type is only for method gguf"),
    Case("two-kinds", setter(stage(NF4), distill={}), f"{S}[2]",
         "exactly one of distill, quantize, evaluate", "exactly one of distill, quantize, evaluate"),
    Case("toleration-seconds", setter(resources, tolerations=[
        {"key": "spot", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}]),
        "spec.resources.tolerations[0].tolerationSeconds", "tolerationSeconds is only for effect NoExecute",
        "tolerationSeconds is only for effect NoExecute"),
    Case("selector-values", setter(resources, topologySpreadConstraints=[
        {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule",
         "labelSelector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]}}]),
        "spec.resources.topologySpreadConstraints[0].labelSelector.matchExpressions[0].values",
        "values must be set for In and NotIn", "values must be set for In and NotIn"),
    Case("min-domains", setter(resources, topologySpreadConstraints=[
        {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway", "minDomains": 2}]),
        "spec.resources.topologySpreadConstraints[0].minDomains", "minDomains is only for whenUnsatisfiable",
        "minDomains is only for whenUnsatisfiable"),
    Case("reserved-variable", setter(resources, env=[{"name": "HOME", "value": "/"}]),
         "spec.resources.env[0].name", RESERVED, RESERVED),
    Case("stage-named-like-a-source", setter(stage(EVAL), name="teacher"), f"{S}[5].name",
         "teacher and student name the pipeline's sources", "teacher and student name the pipeline's sources"),
    Case("evaluate-with-from", setter(stage(EVAL), **{"from": "distill"}), f"{S}[5].from",
         "evaluate takes its inputs from evaluate.of, not from", "evaluate takes its inputs from evaluate.of"),
    Case("baseline-not-evaluated", setter(evaluate, baseline="gptq", of=["distill", "nf4"], gates={}),
         f"{S}[5].evaluate.baseline", "baseline must be one of the variants in `of`", "baseline must be one of the variants"),
    Case("gate-on-a-variant-not-evaluated", setter(lambda d: evaluate(d)["gates"], appliesTo=["nf4", "ghost"]),
         f"{S}[5].evaluate.gates.appliesTo", "gates.appliesTo must name variants in `of`",
         "gates.appliesTo must name variants in `of`"),
    Case("kl-divergence-negative", setter(lambda d: evaluate(d)["gates"], maxKLDivergence=-0.01),
         f"{S}[5].evaluate.gates.maxKLDivergence", "must be >= 0", "should be greater than or equal to 0"),
    Case("top1-agreement-above-one", setter(lambda d: evaluate(d)["gates"], minTop1Agreement=1.5),
         f"{S}[5].evaluate.gates.minTop1Agreement", "must be <= 1", "should be less than or equal to 1"),
    Case("on-missing-variant-enum", setter(evaluate, onMissingVariant="ignore"),
         f"{S}[5].evaluate.onMissingVariant", "must be one of fail, skip", 'Unsupported value: "ignore"'),
    Case("kl-gate-on-a-variant-not-evaluated",
         setter(lambda d: evaluate(d)["gates"], maxKLDivergence=0.05, appliesTo=["gguf", "ce"]),
         f"{S}[5].evaluate.gates.appliesTo", "gates.appliesTo must name variants in `of`",
         "gates.appliesTo must name variants in `of`"),
    Case("variant-twice", lambda d: evaluate(d)["of"].append("nf4"), f"{S}[5].evaluate.of",
         "`of` lists a variant twice", "`of` lists a variant twice"),
    # Tasks (lm-evaluation-harness): what the fields alone decide; unknown names and missing data in the stage.
    Case("task-limit-zero", setter(evaluate, tasks=[{"name": "arc_easy", "limit": 0}]), f"{S}[5].evaluate.tasks[0].limit",
         "limit 0 would score no example", "limit 0 would score no example"),
    Case("task-fewshot-negative", setter(evaluate, tasks=[{"name": "arc_easy", "numFewshot": -1}]),
         f"{S}[5].evaluate.tasks[0].numFewshot", "must be >= 0", "should be greater than or equal to 0"),
    Case("task-twice", setter(evaluate, tasks=[{"name": "arc_easy"}, {"name": "arc_easy", "limit": 5}]),
         f"{S}[5].evaluate.tasks", "`tasks` lists a task twice", "`tasks` lists a task twice"),
    Case("task-from-the-hub", setter(evaluate, tasks=[{"name": "arc_easy", "uri": "hf://allenai/ai2_arc"}]),
         f"{S}[5].evaluate.tasks[0].uri", "a task's uri is an s3://, file:// or pvc:// folder",
         "a task's uri is an s3://, file:// or pvc:// folder"),
    Case("recovery-gate-without-tasks", both(setter(evaluate, tasks=[]), setter(lambda d: evaluate(d)["gates"], minRecovery=0.9)),
         f"{S}[5].evaluate.gates.minRecovery", "gates.minRecovery needs tasks", "gates.minRecovery needs tasks"),
    # How stages name each other: CEL across the list (api.STAGE_REFERENCES), plan.semantic_errors.
    Case("duplicate-stage", setter(stage(CE_ONLY), name="distill"), f"{S}[1].name",
         "duplicate stage name 'distill'", "stage names must be unique", api_path=S, planner=True),
    Case("from-unknown", setter(stage(NF4), **{"from": "ghost"}), f"{S}[2].from", "'ghost' names no stage",
         STAGE_FROM, api_path=S, planner=True),
    Case("from-later-stage", both(setter(stage(NF4), **{"from": "late"}), append_stage(name="late", distill={})),
         f"{S}[2].from", "'late' must be an earlier stage", STAGE_FROM, api_path=S, planner=True),
    Case("from-a-quantized-model", setter(stage(GGUF), **{"from": "nf4"}), f"{S}[4].from",
         "'nf4' is a quantize stage", "a stage's `from` must name teacher, student or a distill stage",
         api_path=S, planner=True),
    Case("variant-unknown", lambda d: evaluate(d)["of"].append("ghost"), f"{S}[5].evaluate.of[7]",
         "'ghost' names no stage", "evaluate.of must name teacher, student or earlier stages",
         api_path=S, planner=True),
    Case("variant-an-evaluation", append_stage(name="again", evaluate={"of": ["eval"]}),
         f"{S}[6].evaluate.of[0]", "'eval' is a evaluate stage", "evaluate.of must name models",
         api_path=S, planner=True),
    # Offline teacher logits (a teacherLogits stage and the distill stages that read it).
    Case("teacher-logits-for-alpha-zero", setter(lambda d: d["spec"]["stages"][CE_ONLY]["distill"], teacherLogits="distill"),
         f"{S}[1].distill.teacherLogits", "teacherLogits is for method logits with alpha > 0",
         "teacherLogits is for method logits with alpha > 0"),
    Case("teacher-load-with-teacher-logits", setter(distill, teacherLoad="int8", teacherLogits="tl"),
         f"{S}[0].distill.teacherLoad", "with teacherLogits no teacher is loaded", "with teacherLogits no teacher is loaded"),
    Case("teacher-logits-with-from", append_stage(name="tl", teacherLogits={}, **{"from": "distill"}), f"{S}[6].from",
         "teacherLogits runs spec.teacher, not from", "teacherLogits runs spec.teacher, not from"),
    Case("teacher-logits-unknown", setter(distill, teacherLogits="ghost"), f"{S}[0].distill.teacherLogits",
         "'ghost' names no stage", TEACHER_LOGITS_REF, api_path=S, planner=True),
    Case("teacher-logits-of-a-distill-stage", setter(lambda d: d["spec"]["stages"][CE_ONLY]["distill"], alpha=0.5,
                                                     teacherLogits="distill"),
         f"{S}[1].distill.teacherLogits", "'distill' is a distill stage", TEACHER_LOGITS_REF,
         api_path=S, planner=True),
    Case("teacher-logits-window", both(append_stage(name="tl", teacherLogits={"maxSeqLength": 64}),
                                       append_stage(name="late", distill={"teacherLogits": "tl"})),
         f"{S}[7].distill.maxSeqLength", "512, but stage 'tl' stores windows of 64 tokens",
         "a distill stage's maxSeqLength must equal that of the teacherLogits stage", api_path=S, planner=True),
    Case("variant-teacher-logits", both(lambda d: d["spec"]["stages"].insert(EVAL, {"name": "tl", "teacherLogits": {}}),
                                        lambda d: d["spec"]["stages"][EVAL + 1]["evaluate"]["of"].append("tl")),
         f"{S}[6].evaluate.of[7]", "'tl' is a teacher_logits stage",
         "evaluate.of must name models", api_path=S, planner=True),
    # Effective resources: the planner alone (a stage inherits what it does not set).
    Case("workers-not-gpus", both(setter(resources, gpus=2), setter(stage(DISTILL), resources={"workers": 3})),
         f"{S}[0].resources.workers", "3 workers on 2 GPUs", None, planner=True),
    Case("cpu-nodes", setter(stage(DISTILL), resources={"nodes": 2}), f"{S}[0].resources.nodes",
         "2 nodes with gpus 0 would train on CPUs across nodes", None, planner=True),
    Case("nodes-of-a-quantize-stage", setter(stage(GGUF), resources={"nodes": 2}), f"{S}[4].resources.nodes",
         "only distill stages run several workers", None, planner=True),
    Case("global-batch-over-workers", both(setter(distill, globalBatchSize=24),
                                           setter(stage(DISTILL), resources={"workers": 2})),
         f"{S}[0].distill.globalBatchSize", "does not divide into batchSize 8 x 2 workers", None, planner=True),
]


def quantize_as(**fields: Any) -> Callable[[dict], None]:
    """The demo's gptq stage with `fields` as its whole quantize block."""
    return lambda doc: doc["spec"]["stages"][GPTQ].update(quantize=copy.deepcopy(fields))


# Quantize methods and their fields together (api.QuantizeSpec.RULES): a scheme and a bit width, a
# field of another method. What only the model decides (groupSize against the layers' widths, an
# ignore pattern that matches no module) is refused by the stage: tests/jobs/test_quantize.py.
CASES += [
    # The demo runs on CPUs (resources.gpus 0): the planner alone knows the stage's effective resources.
    Case("awq-on-cpu", quantize_as(method="awq"), f"{S}[3].quantize.method", "awq runs on GPUs only", None, planner=True),
    Case("imatrix-of-q8_0", quantize_as(method="gguf", type="q8_0", imatrix=True), f"{S}[3].quantize.imatrix",
         "imatrix needs a type made by llama.cpp's quantizer", "imatrix needs a type made by llama.cpp's quantizer"),
    Case("imatrix-of-gptq", quantize_as(method="gptq", imatrix=True), f"{S}[3].quantize.imatrix",
         "imatrix is only for method gguf", "imatrix is only for method gguf"),
    Case("awq-bits-8", quantize_as(method="awq", bits=8), f"{S}[3].quantize.bits",
         "awq writes 4-bit weights (W4A16): bits must be 4", "awq writes 4-bit weights (W4A16): bits must be 4"),
    Case("bits-of-fp8", quantize_as(method="fp8-dynamic", bits=4), f"{S}[3].quantize.bits",
         "bits is only for methods gptq, awq", "bits is only for methods gptq, awq"),
    Case("group-size-of-w8a8", quantize_as(method="w8a8-int8", groupSize=128), f"{S}[3].quantize.groupSize",
         "groupSize is only for methods gptq, awq", "groupSize is only for methods gptq, awq"),
    Case("actorder-of-awq", quantize_as(method="awq", actorder="static"), f"{S}[3].quantize.actorder",
         "actorder is only for methods gptq, w8a8-int8", "actorder is only for methods gptq, w8a8-int8"),
    Case("ignore-of-bnb", quantize_as(method="bnb-nf4", ignore=["lm_head"]), f"{S}[3].quantize.ignore",
         "ignore is only for methods gptq, awq, fp8-dynamic, w8a8-int8",
         "ignore is only for methods gptq, awq, fp8-dynamic, w8a8-int8"),
    Case("actorder-enum", quantize_as(method="gptq", actorder="group"), f"{S}[3].quantize.actorder",
         "must be one of static, none", 'Unsupported value: "group"'),
]


# -- the CRD without a cluster ------------------------------------------------------------------


@cache
def _crd_schema() -> dict:
    doc = yaml.safe_load((ROOT / "crds" / "compressionpipelines.yaml").read_text())
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@cache
def _program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_holds(rule: str, value: Any) -> bool:
    import celpy

    return bool(_program(rule).evaluate({"self": celpy.json_to_cel(value)}))


def _defaulted(schema: dict, value: Any) -> Any:
    """`value` with the schema's defaults filled in, as the API server stores it."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, prop in schema["properties"].items():
            if name not in out and "default" in prop:
                out[name] = copy.deepcopy(prop["default"])
            if name in out:
                out[name] = _defaulted(prop, out[name])
        return out
    if isinstance(value, list) and "items" in schema:
        return [_defaulted(schema["items"], v) for v in value]
    return value


def _cel_errors(schema: dict, value: Any, path: str) -> Iterator[tuple[str, str]]:
    for rule in schema.get("x-kubernetes-validations", []):
        if not cel_holds(rule["rule"], value):
            yield path + rule.get("fieldPath", ""), rule["message"]
    if isinstance(value, dict):
        for name, prop in (schema.get("properties") or {}).items():
            if name in value:
                yield from _cel_errors(prop, value[name], f"{path}.{name}" if path else name)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from _cel_errors(schema["items"], item, f"{path}[{i}]")


def _path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + part
    return out


def crd_errors(doc: dict) -> list[tuple[str, str]]:
    """(field, message) for everything the CRD's schema and CEL rules refuse in `doc`."""
    import jsonschema

    schema = _crd_schema()
    doc = _defaulted(schema, doc)
    validator = jsonschema.Draft4Validator(schema)
    errors = [(_path(e.absolute_path), e.message) for e in validator.iter_errors(doc)]
    if errors:  # the API server runs CEL on what passed the schema only
        return errors
    return list(_cel_errors(schema, doc, ""))
