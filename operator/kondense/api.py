"""The CompressionPipeline API: spec and status models, the single source of truth.

The CRD in crds/ is generated from these models (`kondense crd`), the local runner parses the
same YAML with them, and the document handed to a stage's Job (`StageRun`) is built from them.
Field names are camelCase on the wire and snake_case in Python.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kondense.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CompressionPipeline"
PLURAL = "compressionpipelines"
SINGULAR = "compressionpipeline"
SHORT_NAMES = ["cpl"]

# Names that `from` and `evaluate.of` may use besides stage names.
SOURCES = ("teacher", "student")

STAGE_NAME_RE = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
STAGE_NAME_MAX = 24  # leaves room for "<pipeline>-<stage>-<digest>" within 63 characters
PIPELINE_NAME_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
PIPELINE_NAME_MAX = 40  # the same room for the pipeline's name
# Names of Kubernetes objects (RFC 1123 subdomains: Secrets, ConfigMaps, claims, PriorityClasses).
OBJECT_NAME_RE = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
SEED_MAX = 2**31 - 1  # numpy's seeds are 32-bit; each worker adds its rank to the stage's seed


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


@dataclass(frozen=True)
class Rule:
    """A rule stated once, next to the fields it reads: `cel` goes into the CRD, where the API
    server evaluates it at admission, and `holds` is the same test in Python, for `kondense
    validate` and the operator. Both refuse with `message`, about `field` (a path below the
    object, the rule's fieldPath). tests/unit/test_api.py runs both on invalid pipelines."""

    cel: str
    holds: Callable[[Any], bool]
    message: str
    field: str | None = None

    def entry(self) -> dict[str, str]:
        return cel(self.cel, self.message, self.field)


def matching(regex: str, message: str, when: str = "", forbid: bool = False) -> Rule:
    """A Rule on a string, from one regular expression that RE2 (the API server's CEL) and Python
    read alike: the value must contain a match (`forbid`: must not), if it starts with `when`."""
    assert "'" not in regex, "the regex goes into a CEL string literal"
    test = f"{'!' if forbid else ''}self.matches(r'{regex}')"
    # RE2's $ is the end of the text only; Python's also matches before a final newline.
    compiled = re.compile(regex.replace("$", r"\Z"))

    def holds(value: str) -> bool:
        return not value.startswith(when) or (compiled.search(value) is None) == forbid

    return Rule(f"!self.startsWith('{when}') || {test}" if when else test, holds, message)


class RuleError(ValueError):
    """A Rule that does not hold; validation.format_errors adds its `field` to the error's path."""

    def __init__(self, rule: Rule):
        super().__init__(rule.message)
        self.field = rule.field or ""


def with_rules(*rules: Rule) -> ConfigDict:
    """The model_config of a model whose RULES are `rules`: their CEL goes into its schema."""
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": [r.entry() for r in rules]})


def checked(rules: tuple[Rule, ...], **field: Any) -> Any:
    """A string type that `rules` check: CEL rules on the field in the CRD, the same in Python."""

    def check(value: str) -> str:
        for rule in rules:
            if not rule.holds(value):
                raise ValueError(rule.message)
        return value

    extra = {"x-kubernetes-validations": [r.entry() for r in rules]}
    return Annotated[str, Field(json_schema_extra=extra, **field), AfterValidator(check)]


class Model(BaseModel):
    """Base for every API object: camelCase aliases, unknown fields rejected, RULES checked."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )
    # Rules on the object's fields together; a subclass sets model_config = with_rules(*RULES).
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _rules_hold(self) -> Model:
        for rule in self.RULES:
            if not rule.holds(self):
                raise RuleError(rule)
        return self

    def dump(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------

# What the stores and the stage runtime accept (store.py, kondense_jobs.runtime): every URI is
# parsed into these parts, so one they would misread never reaches a Job.
S3_BUCKET = r"[a-z0-9][-a-z0-9.]{1,61}[a-z0-9]"  # S3's bucket names: 3-63 characters
CLAIM = r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?"  # a PersistentVolumeClaim's name
HUB_NAME = r"[A-Za-z0-9][-A-Za-z0-9_.]{0,95}"  # a Hub user, organisation or repository
URI_MAX = 2048
FILE_RULE = matching(
    r"^file://(localhost)?/[^/]", "a file:// URI holds an absolute path: file:///path/to/folder", "file://"
)
# Each part of a URI is read as written: the path is joined to a bucket, a mount or a folder.
PLAIN_PATH = (
    matching(r"[\x00-\x1f\x7f]", "must not contain control characters", forbid=True),
    matching(
        r"[?#]", "must not contain ? or #: a URI is read as a path (a Hub revision goes in `revision`)",
        forbid=True,
    ),
    matching(r"/[.][.]?(/|$)", "must not contain . or .. path segments", forbid=True),
)
SOURCE_RULES = (
    matching(
        r"^(s3|file|pvc|hf)://",
        "must be s3://bucket/key, file:///absolute/path, pvc://claim/path or hf://org/name",
    ),
    matching(
        rf"^s3://{S3_BUCKET}/[^/]",
        "an s3:// URI names a bucket (3-63 lowercase letters, digits, . and -) and a key: s3://bucket/key",
        "s3://",
    ),
    FILE_RULE,
    matching(
        rf"^pvc://{CLAIM}(/|$)",
        "a pvc:// URI names a PersistentVolumeClaim of the pipeline's namespace: pvc://claim/path",
        "pvc://",
    ),
    matching(
        rf"^hf://{HUB_NAME}(/{HUB_NAME})?(@[-A-Za-z0-9_./]+)?$",
        "an hf:// URI names a Hub repository: hf://org/name",
        "hf://",
    ),
    *PLAIN_PATH,
)
STORAGE_RULES = (
    matching(r"^(s3|file)://", "must be s3://bucket/prefix or file:///absolute/path"),
    matching(
        rf"^s3://{S3_BUCKET}(/|$)",
        "an s3:// URI names a bucket (3-63 lowercase letters, digits, . and -): s3://bucket/prefix",
        "s3://",
    ),
    FILE_RULE,
    *PLAIN_PATH,
)

Uri = checked(
    SOURCE_RULES,
    max_length=URI_MAX,
    description="Where the files live: s3://bucket/key, file:///abs/path, pvc://claim/path or "
    "hf://org/name (revision in `revision`).",
)
StorageUri = checked(STORAGE_RULES, max_length=URI_MAX, description="s3://bucket/prefix or file:///abs/path.")
# A task folder: SOURCE_RULES without hf:// (whose regex alone would put the CRD over the API server's
# CEL cost budget, with up to MAX_STAGES x MAX_TASKS of them).
TaskUri = checked(
    (
        matching(
            r"^(s3|file|pvc)://",
            "a task's uri is an s3://, file:// or pvc:// folder (a Hub dataset: copy it into a datasets cache there)",
        ),
        *(rule for rule in SOURCE_RULES[1:] if "hf://" not in rule.message),
    ),
    max_length=URI_MAX,
    description="s3://bucket/key, file:///abs/path or pvc://claim/path.",
)


class ModelRef(Model):
    """A model in Hugging Face layout (config.json, tokenizer, safetensors)."""

    RULES: ClassVar = (
        Rule(
            "!has(self.revision) || self.uri.startsWith('hf://')",
            lambda m: m.revision is None or m.uri.startswith("hf://"),
            "revision is only for hf:// URIs",
            ".revision",
        ),
    )
    model_config = with_rules(*RULES)

    uri: Uri
    revision: str | None = Field(
        None, min_length=1, max_length=256, description="Hub revision (branch, tag or commit) for hf:// URIs."
    )


class DatasetRef(Model):
    """A JSON Lines file (or a folder of them): one record per line."""

    uri: Uri
    text_field: str = Field(
        "text", min_length=1, description="Record field holding the training and evaluation text."
    )
    prompt_field: str = Field(
        "prompt",
        min_length=1,
        description="Record field holding a prompt, for synthetic and gkd distillation. Records without it "
        "use the first `promptTokens` tokens of the text as the prompt.",
    )
    prompt_tokens: int = Field(32, ge=1, le=4096, description="Prompt length taken from text when a record has no prompt.")
    messages_field: str = Field(
        "messages",
        min_length=1,
        description="Record field holding a chat conversation, a list of {role, content} strings, rendered with the "
        "tokenizer's chat template (instruct models). It takes the place of the text field: logits trains on the "
        "whole conversation; synthetic and gkd prompt with the turns up to the last user turn (plus the "
        "template's generation prompt), gkd's completion being the assistant turn after it. Records with it need "
        "a tokenizer with a chat_template.",
    )
    eval_split: float = Field(
        0.05, gt=0, lt=1, description="Fraction of records held out for evaluation (the same split in every stage)."
    )
    max_samples: int | None = Field(None, ge=1, description="Use at most this many records (after shuffling with `seed`).")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the shuffle that makes the train/eval split.")


class Storage(Model):
    """Where every stage's artifacts are staged."""

    uri: StorageUri
    endpoint: str | None = Field(
        None,
        pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$",
        max_length=URI_MAX,
        description="S3 endpoint URL for S3-compatible stores (MinIO, Ceph, ...): http(s)://host[:port].",
    )
    region: str | None = Field(
        None, min_length=1, max_length=64, description="S3 region; defaults to the AWS environment of the pod."
    )
    credentials_secret: str | None = Field(
        None,
        pattern=OBJECT_NAME_RE,
        max_length=253,
        description="Secret in the pipeline's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(and optionally AWS_SESSION_TOKEN). Mounted as environment variables, never copied into status.",
    )
    deletion_policy: Literal["Retain", "Delete"] = Field(
        "Retain",
        description="What deleting the pipeline does to its artifacts (everything under <uri>/<namespace>/<name>/). "
        "Retain keeps them. Delete removes them with a cleanup Job first: the pipeline keeps the operator's "
        "finalizer until the Job has finished.",
    )


class Toleration(Model):
    """A core/v1 Toleration."""

    # Pod validation's rules, at admission rather than when the operator creates the Job.
    RULES: ClassVar = (
        Rule(
            "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            lambda t: bool(t.key) or t.operator == "Exists",
            "an empty key (all taints) needs operator Exists",
            ".operator",
        ),
        Rule(
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            lambda t: t.operator != "Exists" or not t.value,
            "value must be empty with operator Exists",
            ".value",
        ),
        Rule(
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
            "tolerationSeconds is only for effect NoExecute",
            ".tolerationSeconds",
        ),
    )
    model_config = with_rules(*RULES)

    key: str | None = Field(None, description="Taint key; empty matches all keys with operator Exists.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default Equal).")
    value: str | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description="Taint effect to tolerate.")
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


Quantity = Annotated[
    str,
    Field(
        pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$",
        description="A Kubernetes quantity, e.g. 8, 500m, 64Gi.",
    ),
]


# Variables kondense sets in every stage container itself (manifests._env): a pipeline's `env`
# may not name them. Storage credentials come from spec.storage.credentialsSecret, so that the
# stages and the cleanup Job read the same ones.
RESERVED_ENV = (
    "HOME", "TMPDIR", "HF_HOME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
)
RESERVED_ENV_PREFIX = "KONDENSE_"
RESERVED_ENV_MESSAGE = (
    "HOME, TMPDIR, HF_HOME and KONDENSE_* are set by kondense; storage credentials come from "
    "spec.storage.credentialsSecret"
)


def one_of(*fields: str) -> Rule:
    """The rule of a core/v1 union: exactly one of `fields` is set."""
    camel = [to_camel(f) for f in fields]
    return Rule(
        f"[{', '.join(f'has(self.{c})' for c in camel)}].filter(x, x).size() == 1",
        lambda m: sum(getattr(m, f) is not None for f in fields) == 1,
        f"exactly one of {', '.join(camel)} must be set",
    )


class KeySelector(Model):
    """A core/v1 SecretKeySelector or ConfigMapKeySelector: a key of an object in the pipeline's namespace."""

    name: str = Field(
        min_length=1, max_length=253, pattern=OBJECT_NAME_RE, description="Name of the Secret or ConfigMap."
    )
    key: str = Field(
        min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="The key whose value the variable takes."
    )
    optional: bool | None = Field(
        None, description="Start the pod even when the object or key is missing (default false)."
    )


class EnvVarSource(Model):
    """Where a variable's value comes from: a key of a Secret or of a ConfigMap."""

    RULES: ClassVar = (one_of("secret_key_ref", "config_map_key_ref"),)
    model_config = with_rules(*RULES)

    secret_key_ref: KeySelector | None = Field(
        None, description="A key of a Secret in the pipeline's namespace."
    )
    config_map_key_ref: KeySelector | None = Field(
        None, description="A key of a ConfigMap in the pipeline's namespace."
    )


class EnvVar(Model):
    """A core/v1 EnvVar of the stage container: a value, or a Secret's or ConfigMap's key (`valueFrom`)."""

    RULES: ClassVar = (
        Rule(
            "!has(self.value) || !has(self.valueFrom)",
            lambda v: v.value is None or v.value_from is None,
            "value and valueFrom are exclusive",
        ),
        Rule(
            f"!(self.name in [{', '.join(repr(n) for n in RESERVED_ENV)}]) "
            f"&& !self.name.startsWith('{RESERVED_ENV_PREFIX}')",
            lambda v: v.name not in RESERVED_ENV and not v.name.startswith(RESERVED_ENV_PREFIX),
            RESERVED_ENV_MESSAGE,
            ".name",
        ),
    )
    model_config = with_rules(*RULES)

    name: str = Field(min_length=1, max_length=256, description="Variable name, e.g. HF_TOKEN.")
    value: str | None = Field(None, description="The value; $(VAR) names a variable defined before it.")
    value_from: EnvVarSource | None = Field(
        None, description="Take the value from a Secret's or a ConfigMap's key."
    )


class ObjectRef(Model):
    """A core/v1 SecretEnvSource or ConfigMapEnvSource."""

    name: str = Field(
        min_length=1, max_length=253, pattern=OBJECT_NAME_RE, description="Name of the Secret or ConfigMap."
    )
    optional: bool | None = Field(None, description="Start the pod even when it is missing (default false).")


class EnvFromSource(Model):
    """A core/v1 EnvFromSource: every key of a Secret or ConfigMap as a variable."""

    RULES: ClassVar = (one_of("secret_ref", "config_map_ref"),)
    model_config = with_rules(*RULES)

    prefix: str | None = Field(None, max_length=256, description="Prepended to every key.")
    secret_ref: ObjectRef | None = Field(None, description="A Secret in the pipeline's namespace.")
    config_map_ref: ObjectRef | None = Field(None, description="A ConfigMap in the pipeline's namespace.")


def _as_written(schema: dict[str, Any]) -> None:
    """An object kept as written (x-kubernetes-preserve-unknown-fields): the API server checks it
    when it validates the Job."""
    schema.pop("additionalProperties", None)
    schema.update({"type": "object", "x-kubernetes-preserve-unknown-fields": True})


AsWritten = Annotated[dict[str, Any], Field(json_schema_extra=_as_written)]


class Affinity(Model):
    """A core/v1 Affinity, put on the stage pods as written.

    Only its three parts are named here; what is inside each is kept as written and checked by
    the API server when the operator creates the Job (an invalid one fails the stage with
    InvalidSpec and the API server's message). Copying Kubernetes' schema would make the CRD several
    times larger for a field that grows with every Kubernetes release (matchLabelKeys came in
    1.29), and a copy would refuse what a newer API server accepts. The stage pods carry the
    labels kondense.io/pipeline, kondense.io/stage and batch.kubernetes.io/job-name to select them.
    """

    node_affinity: AsWritten | None = Field(None, description="A core/v1 NodeAffinity.")
    pod_affinity: AsWritten | None = Field(
        None, description="A core/v1 PodAffinity, e.g. the pods of one Job in one rack."
    )
    pod_anti_affinity: AsWritten | None = Field(None, description="A core/v1 PodAntiAffinity.")


class LabelSelectorRequirement(Model):
    """A metav1.LabelSelectorRequirement."""

    RULES: ClassVar = (
        Rule(
            "self.operator in ['In', 'NotIn'] ? has(self.values) && self.values.size() > 0 "
            ": !has(self.values) || self.values.size() == 0",
            lambda r: bool(r.values) == (r.operator in ("In", "NotIn")),
            "values must be set for In and NotIn, and empty for Exists and DoesNotExist",
            ".values",
        ),
    )
    model_config = with_rules(*RULES)

    key: str = Field(min_length=1, description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In, NotIn, Exists or DoesNotExist."
    )
    values: list[str] | None = Field(None, description="Values for In and NotIn.")


class LabelSelector(Model):
    """A metav1.LabelSelector."""

    match_labels: dict[str, str] | None = Field(None, description="Labels a pod must have.")
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        None, max_length=16, description="Requirements a pod must meet."
    )


class TopologySpreadConstraint(Model):
    """A core/v1 TopologySpreadConstraint over the stage pods."""

    RULES: ClassVar = (
        Rule(
            "!has(self.minDomains) || self.whenUnsatisfiable == 'DoNotSchedule'",
            lambda c: c.min_domains is None or c.when_unsatisfiable == "DoNotSchedule",
            "minDomains is only for whenUnsatisfiable DoNotSchedule",
            ".minDomains",
        ),
    )
    model_config = with_rules(*RULES)

    max_skew: int = Field(ge=1, description="Largest difference in matching pods between two domains.")
    topology_key: str = Field(
        min_length=1, description="Node label whose values are the domains, e.g. kubernetes.io/hostname."
    )
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"] = Field(
        description="DoNotSchedule or ScheduleAnyway."
    )
    label_selector: LabelSelector | None = Field(
        None, description="The pods counted, e.g. matchLabels {kondense.io/pipeline: <name>}."
    )
    min_domains: int | None = Field(None, ge=1, description="Fewest eligible domains (with DoNotSchedule).")
    node_affinity_policy: Literal["Honor", "Ignore"] | None = Field(
        None, description="Honor or Ignore the pod's node affinity."
    )
    node_taints_policy: Literal["Honor", "Ignore"] | None = Field(
        None, description="Honor or Ignore node taints."
    )
    match_label_keys: list[str] | None = Field(
        None,
        description="Pod label keys whose values narrow labelSelector, e.g. batch.kubernetes.io/job-name.",
    )


class Resources(Model):
    """What each stage's pod asks for, where it may run and what it is given."""

    gpus: int = Field(1, ge=0, le=16, description="GPUs per stage pod, as gpuResource (0 runs on CPU).")
    gpu_memory_gib: float = Field(
        80,
        gt=0,
        le=1024,
        alias="gpuMemoryGiB",
        description="Memory of one GPU, used by the preflight estimate (80 for an H100 80GB).",
    )
    cpu: Quantity | None = Field(None, description="CPU request and limit.")
    memory: Quantity | None = Field(None, description="Memory request and limit.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pod must match.")
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="Extra tolerations; with gpus > 0 the pod also tolerates the nvidia.com/gpu taint and "
        "one named like gpuResource.",
    )
    priority_class_name: str | None = Field(
        None, pattern=OBJECT_NAME_RE, max_length=253, description="PriorityClass of the stage pods."
    )
    queue_name: str | None = Field(
        None,
        pattern=OBJECT_NAME_RE,
        max_length=63,
        description="Kueue LocalQueue: sets the kueue.x-k8s.io/queue-name label.",
    )
    nodes: int = Field(
        1,
        ge=1,
        le=64,
        description="Pods of a distill stage. More than 1 makes an Indexed Job (one pod per node, a headless "
        "Service for their names) whose workers rendezvous through torchrun's c10d at index 0.",
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Training processes per pod (torchrun --nproc-per-node) for distill stages. Default: gpus, "
        "or 1 on CPU; with GPUs it must equal gpus. Set it with gpus 0 to run CPU workers (gloo).",
    )
    active_deadline_seconds: int = Field(86400, ge=60, description="A stage running longer than this fails (DeadlineExceeded).")
    backoff_limit: int = Field(2, ge=0, le=10, description="Retries of a stage after retryable failures.")
    pending_timeout_seconds: int = Field(
        3600,
        ge=0,
        description="A stage whose pod cannot start (Unschedulable, ConfigError, ImagePullFailed, PodCreateFailed) "
        "fails after this long, with that reason; 0 waits forever. A Job suspended for Kueue never fails for it: "
        "past it the pipeline's Ready message asks whether Kueue and its LocalQueue exist.",
    )
    gpu_resource: str | None = Field(
        None,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description="Extended resource that `gpus` is requested as. Default: nvidia.com/gpu. A MIG slice, "
        "e.g. nvidia.com/mig-3g.40gb (set gpuMemoryGiB to the slice's memory), or another vendor's, e.g. "
        "amd.com/gpu. The pod tolerates the nvidia.com/gpu taint and one named like this resource.",
    )
    runtime_class_name: str | None = Field(
        None,
        pattern=OBJECT_NAME_RE,
        max_length=253,
        description="RuntimeClass of the stage pods, e.g. nvidia where the NVIDIA container runtime is not "
        "the nodes' default.",
    )
    affinity: Affinity | None = Field(
        None, description="Node affinity and pod (anti-)affinity of the stage pods."
    )
    topology_spread_constraints: list[TopologySpreadConstraint] = Field(
        default_factory=list,
        max_length=8,
        description="How the stage pods spread over zones, racks or nodes.",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        description="Extra environment variables of the stage container, e.g. HF_TOKEN for gated hf:// "
        "models: {name: HF_TOKEN, valueFrom: {secretKeyRef: {name: hf, key: token}}}.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    env_from: list[EnvFromSource] = Field(
        default_factory=list,
        max_length=16,
        description="Secrets and ConfigMaps whose every key becomes a variable.",
    )
    scratch_size: Quantity | None = Field(
        None,
        description="Local disk of a stage pod: the size limit of its emptyDir, which holds the downloaded "
        "inputs (~/.cache) and the outputs (/scratch), and its ephemeral-storage request, so that the "
        "scheduler picks a node with that much free disk. Default: the operator's jobs.scratchSizeLimit "
        "(200Gi).",
    )
    shm_size: Quantity | None = Field(
        None,
        description="Size limit of /dev/shm, a memory-backed emptyDir that NCCL and data loaders use; what "
        "it holds counts against the pod's memory. Default: no limit of its own (the pod's memory limit).",
    )

    @field_validator("env")
    @classmethod
    def _names_once(cls, env: list[EnvVar]) -> list[EnvVar]:
        names = [v.name for v in env]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"names a variable twice: {', '.join(twice)}")
        return env

    @property
    def workers_per_node(self) -> int:
        """Training processes in each pod: `workers`, else one per GPU, else 1."""
        return self.workers or self.gpus or 1

    @property
    def world_size(self) -> int:
        return self.workers_per_node * self.nodes


Precision = Literal["auto", "fp32", "bf16", "fp16"]


class DistillSpec(Model):
    """Teacher -> student distillation. One method, shared training knobs."""

    RULES: ClassVar = (
        Rule(
            "!has(self.globalBatchSize) || self.globalBatchSize % self.batchSize == 0",
            lambda d: d.global_batch_size is None or d.global_batch_size % d.batch_size == 0,
            "globalBatchSize must be a multiple of batchSize",
            ".globalBatchSize",
        ),
        Rule(
            "!has(self.teacherLoad) || self.teacherLoad != 'sharded' || self.method == 'logits'",
            lambda d: d.teacher_load != "sharded" or d.method == "logits",
            "teacherLoad sharded is only for method logits",
            ".teacherLoad",
        ),
        Rule(
            "!has(self.strategy) || self.strategy != 'fsdp' || self.method != 'gkd'",
            lambda d: d.strategy != "fsdp" or d.method != "gkd",
            "strategy fsdp is not for method gkd (its on-policy generation would gather the student for every token)",
            ".strategy",
        ),
        Rule(
            "!has(self.teacherLogits) || (self.method == 'logits' && self.alpha > 0.0)",
            lambda d: d.teacher_logits is None or (d.method == "logits" and d.alpha > 0),
            "teacherLogits is for method logits with alpha > 0 (the KD term is what reads them)",
            ".teacherLogits",
        ),
        Rule(
            "!has(self.teacherLogits) || !has(self.teacherLoad) || self.teacherLoad == 'auto'",
            lambda d: d.teacher_logits is None or d.teacher_load == "auto",
            "teacherLoad says how a teacher run online is held; with teacherLogits no teacher is loaded",
            ".teacherLoad",
        ),
    )
    model_config = with_rules(*RULES)

    # Fields that say how a stage runs, not what it makes: left out of its content address at
    # these values, as resources are (a stage re-run on more GPUs reuses its artifact).
    NOT_IN_DIGEST: ClassVar[dict[str, tuple]] = {
        "strategy": ("auto", "ddp", "fsdp"),
        "teacherLoad": ("auto", "replicated", "sharded"),
        "globalBatchSize": (None,),
    }

    method: Literal["logits", "synthetic", "gkd"] = Field(
        "logits",
        description="logits: KL to the teacher's softened logits plus CE; synthetic: SFT on teacher "
        "completions; gkd: on-policy generalized KD (TRL).",
    )
    temperature: float = Field(2.0, gt=0, le=20, description="Softmax temperature of logit distillation (KL scaled by T^2).")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KD term; 1 - alpha weighs the cross-entropy on labels.")
    lmbda: float = Field(0.5, ge=0, le=1, description="gkd: fraction of batches generated on-policy by the student.")
    beta: float = Field(0.5, ge=0, le=1, description="gkd: interpolation of the generalized JSD (0 = forward KL, 1 = reverse KL).")
    epochs: float = Field(1, gt=0, le=100, description="Passes over the training split (ignored when maxSteps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    learning_rate: float = Field(2e-5, gt=0, le=1, description="Peak learning rate (linear decay).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    batch_size: int = Field(4, ge=1, le=1024, description="Sequences per worker per forward pass (the micro-batch).")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-batches per optimizer step (derived from globalBatchSize when that is set)."
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        le=1048576,
        description="Sequences per optimizer step over all workers. When set, gradientAccumulationSteps is "
        "globalBatchSize / (batchSize x workers x nodes), which must be a whole number: the same global batch, "
        "and so the same training, on any worker count.",
    )
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="How the student is spread over the workers. ddp: a full replica per worker (fastest when it "
        "fits). fsdp: weights, gradients and optimizer state sharded over all workers (FSDP2 through "
        "transformers/accelerate). auto: ddp when the plan says it fits, else fsdp.",
    )
    teacher_load: Literal["auto", "replicated", "sharded", "int8", "nf4"] = Field(
        "auto",
        description="How each worker holds the teacher (logits, gkd). replicated: a full copy in the training "
        "precision. sharded: split over all workers with FSDP2, gathered layer by layer for the forward pass "
        "(logits only). int8 / nf4: a bitsandbytes-quantized copy. auto: replicated when it fits, else sharded.",
    )
    max_seq_length: int = Field(512, ge=8, le=131072, description="Tokens per training sequence.")
    precision: Precision = Field("auto", description="auto: bf16 on GPUs that support it, fp32 on CPU.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed of initialisation, shuffling and sampling.")
    checkpoint_every: int = Field(
        100, ge=1, description="Steps between checkpoints staged in the store; a restarted stage resumes from the newest."
    )
    max_new_tokens: int = Field(128, ge=1, le=8192, description="synthetic and gkd: tokens generated per prompt.")
    generation_temperature: float = Field(0.7, ge=0, le=5, description="synthetic and gkd: sampling temperature (0 = greedy).")
    top_p: float = Field(0.95, gt=0, le=1, description="synthetic: nucleus sampling threshold.")
    generation_chunk: int = Field(
        256,
        ge=1,
        le=1_000_000,
        description="synthetic: prompts per chunk of teacher generation. Each chunk is split over the workers and "
        "committed to the store as it completes; a restarted stage reuses every committed chunk and regenerates at "
        "most the one it was stopped in.",
    )
    teacher_logits: str | None = Field(
        None,
        pattern=STAGE_NAME_RE,
        max_length=STAGE_NAME_MAX,
        description="logits: train from the top-k teacher logits that this earlier teacherLogits stage stored, "
        "with no teacher in memory, instead of running the teacher at every step. Its maxSeqLength must equal "
        "this stage's. The KD term is then the KL at `temperature` over the teacher's top k plus one bucket for every other token.",
    )

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on `world_size` workers."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        return max(1, self.global_batch_size // (self.batch_size * world_size))

    def global_batch(self, world_size: int) -> int:
        return self.global_batch_size or self.batch_size * self.gradient_accumulation_steps * world_size


# llama.cpp file types: the converter writes the first four, llama.cpp's quantizer the rest.
GGUF_CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_QUANTIZER_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "iq4_xs")
GGUF_TYPES = GGUF_CONVERTER_TYPES + GGUF_QUANTIZER_TYPES
GGUF_IMATRIX_DEFAULT = ("q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k", "iq4_xs")  # K-quants and IQ types


# The engines that load each method's output (report.json's variants[].loads_in; README's table).
LOADS_IN = {
    "bnb-nf4": "transformers, vLLM",
    "bnb-int8": "transformers",
    "gptq": "vLLM, transformers",
    "awq": "vLLM, transformers",
    "fp8-dynamic": "vLLM (FP8 kernels: Ada/Hopper+), transformers",
    "w8a8-int8": "vLLM (INT8 kernels: Turing+), transformers",
    "gguf": "llama.cpp, transformers (dequantized)",
}


class QuantizeSpec(Model):
    """Quantize a model. Fields that a method does not use are rejected.

    Which engines load each method's output, and where it runs fast (the Field descriptions say it
    to `kubectl explain`; README.md has the table):
      bnb-nf4, bnb-int8  transformers with bitsandbytes (vLLM loads bnb-nf4 too); any CUDA GPU.
      gptq, awq          compressed-tensors W4A16/W8A16: vLLM (Marlin/Machete kernels, Ampere and newer)
                         and transformers; not llama.cpp.
      fp8-dynamic        compressed-tensors W8A8 FP8: vLLM (FP8 kernels need Ada/Hopper or newer; older
                         GPUs fall back to weight-only FP8 Marlin) and transformers; not llama.cpp.
      w8a8-int8          compressed-tensors W8A8 INT8: vLLM (INT8 kernels, Turing and newer) and
                         transformers; not llama.cpp.
      gguf               llama.cpp (and transformers, dequantized); CPUs and GPUs.
    """

    # Fields that only some methods read.
    LLMC_METHODS: ClassVar[tuple[str, ...]] = ("gptq", "awq", "fp8-dynamic", "w8a8-int8")  # via llm-compressor
    # Kept in full precision unless `ignore` says otherwise: the output head and MoE routers/gates
    # (Qwen-MoE/DeepSeek mlp.gate, Mixtral block_sparse_moe.gate, Llama-4/GPT-OSS router).
    DEFAULT_IGNORE: ClassVar[tuple[str, ...]] = ("lm_head", "re:.*mlp[.]gate$", "re:.*block_sparse_moe[.]gate$", "re:.*router$")
    METHOD_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "type": ("gguf",),
        "bits": ("gptq", "awq"),
        "group_size": ("gptq", "awq"),
        "actorder": ("gptq", "w8a8-int8"),
        "smoothing_strength": ("w8a8-int8",),
        "ignore": LLMC_METHODS,
        "double_quant": ("bnb-nf4",),
        "imatrix": ("gguf",),
    }
    RULES: ClassVar = (
        *(
            Rule(
                f"!has(self.{to_camel(name)}) || "
                + (f"self.method in {list(methods)!r}" if len(methods) > 1 else f"self.method == {methods[0]!r}"),
                lambda q, name=name, methods=methods: getattr(q, name) is None or q.method in methods,
                f"{to_camel(name)} is only for method{'s' if len(methods) > 1 else ''} {', '.join(methods)}",
                f".{to_camel(name)}",
            )
            for name, methods in METHOD_FIELDS.items()
        ),
        Rule(
            "!has(self.groupSize) || self.groupSize != 0",
            lambda q: q.group_size != 0,
            "groupSize must be -1 (per channel) or positive",
            ".groupSize",
        ),
        Rule(
            "!has(self.imatrix) || !self.imatrix || (has(self.type) && !(self.type in "
            + repr(list(GGUF_CONVERTER_TYPES)) + "))",
            lambda q: not q.imatrix or (q.type is not None and q.type not in GGUF_CONVERTER_TYPES),
            "imatrix needs a type made by llama.cpp's quantizer (not f32, f16, bf16 or q8_0, which the converter "
            "writes), e.g. type: q4_k_m",
            ".imatrix",
        ),
        Rule(
            "self.method != 'awq' || !has(self.bits) || self.bits == 4",
            lambda q: q.method != "awq" or q.bits in (None, 4),
            "awq writes 4-bit weights (W4A16): bits must be 4; use method gptq for 8-bit weights",
            ".bits",
        ),
    )
    model_config = with_rules(*RULES)

    # Fields added after artifacts were made: unset, they move no digest (gptq's actorder was static).
    NOT_IN_DIGEST: ClassVar[dict[str, tuple]] = {"actorder": (None,), "ignore": (None,), "smoothingStrength": (None,)}
    # `imatrix` is in the digest as resolved (uses_imatrix), not as written: see plan._identity.

    method: Literal["bnb-nf4", "bnb-int8", "gptq", "awq", "fp8-dynamic", "w8a8-int8", "gguf"] = Field(
        description="bnb-nf4 / bnb-int8: bitsandbytes via transformers (loads in transformers; vLLM loads "
        "bnb-nf4 too; any CUDA GPU). "
        "gptq: GPTQ W{bits}A16, calibrated. awq: AWQ W4A16 (activation-aware scales, then round-to-nearest), "
        "calibrated; needs a GPU to quantize. Both write compressed-tensors that vLLM (4 and 8 bits; "
        "Marlin/Machete kernels, Ampere or newer) and transformers load, not llama.cpp. "
        "fp8-dynamic: W8A8 FP8 weights with per-token dynamic activation scales, no calibration data; loads in "
        "vLLM and transformers; fast FP8 matmuls need Ada/Hopper (sm89+) or newer, older GPUs run it as "
        "weight-only FP8. w8a8-int8: SmoothQuant then GPTQ to INT8 weights and dynamic INT8 activations, "
        "calibrated; loads in vLLM (INT8 kernels, Turing or newer) and transformers. "
        "gguf: llama.cpp's converter and quantizer; loads in llama.cpp (CPU and GPU) and, dequantized, transformers."
    )
    bits: Literal[4, 8] | None = Field(
        None,
        description="gptq: weight bits, 4 or 8 (default 4); awq: 4 only. vLLM's compressed-tensors kernels take "
        "4 and 8 bits, so 2/3-bit GPTQ is not offered.",
    )
    group_size: int | None = Field(
        None, ge=-1, le=4096,
        description="gptq, awq: columns per quantization group, -1 for per-channel (default 128). It must divide "
        "the input width of every quantized layer: the stage refuses others (exit 10).",
    )
    actorder: Literal["static", "none"] | None = Field(
        None,
        description="gptq, w8a8-int8: GPTQ's activation ordering. static (default, llm-compressor's "
        "recommendation): columns quantized in order of activation size, better accuracy at no runtime cost; "
        "none: in storage order.",
    )
    ignore: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None,
        max_length=64,
        description="gptq, awq, fp8-dynamic, w8a8-int8: modules kept in full precision, by name, by class name "
        "or by regular expression after 're:' (e.g. 're:.*mlp[.]gate$'). Default: lm_head and MoE routers/gates "
        "(" + ", ".join(f"'{p}'" for p in DEFAULT_IGNORE) +
        "). Each pattern given must match a module of the model: the stage refuses one that matches none (exit 10).",
    )
    smoothing_strength: float | None = Field(
        None, gt=0, lt=1,
        description="w8a8-int8: SmoothQuant's alpha, how much activation range moves into the weights (default 0.8).",
    )
    calibration_samples: int = Field(
        128, ge=1, le=100000,
        description="gptq, awq, w8a8-int8, gguf with imatrix: calibration windows drawn from the training split.",
    )
    calibration_seq_length: int = Field(
        512, ge=8, le=131072, description="gptq, awq, w8a8-int8, gguf with imatrix: tokens per calibration window."
    )
    double_quant: bool | None = Field(None, description="bnb-nf4: quantize the quantization constants too (default true).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="bnb: dtype of the matmuls on dequantized weights."
    )
    type: Literal[GGUF_TYPES] | None = Field(  # type: ignore[valid-type]
        None,
        description="gguf: llama.cpp file type (default q8_0). f32, f16, bf16 and q8_0 come from the converter; the "
        "others from llama.cpp's quantizer. K-quants and IQ types quantize rows in blocks of 256: a tensor whose rows "
        "do not divide falls back to a 32-block type (the report counts them).",
    )
    imatrix: bool | None = Field(
        None,
        description="gguf: weigh the quantization error by llama.cpp's importance matrix (llama-imatrix over "
        "calibrationSamples windows of calibrationSeqLength tokens of the training split). Default: on for the "
        "K-quants and IQ types (" + ", ".join(GGUF_IMATRIX_DEFAULT) + "), off for the others; the converter's "
        "types (f32, f16, bf16, q8_0) take none.",
    )

    def describe(self) -> str:
        """How the variant is made, in a few words: 'gptq W4A16 g128', 'gguf q4_k_m + imatrix'."""
        if self.method in ("gptq", "awq"):
            group = self.group_size if self.group_size is not None else 128
            return f"{self.method} W{self.bits or 4}A16 " + ("per-channel" if group == -1 else f"g{group}")
        if self.method == "gguf":
            return f"gguf {self.type or 'q8_0'}" + (" + imatrix" if self.uses_imatrix else "")
        return self.method

    @property
    def uses_imatrix(self) -> bool:
        """Whether this gguf stage quantizes with an importance matrix (its default resolved)."""
        if self.method != "gguf" or (self.type or "q8_0") in GGUF_CONVERTER_TYPES:
            return False
        return self.imatrix if self.imatrix is not None else self.type in GGUF_IMATRIX_DEFAULT


class TeacherLogitsSpec(Model):
    """One pass of the teacher over the training windows, its top-k logits stored for logit distillation.

    The artifact (chunks of windows: token ids, the top-k log-probabilities in fp16 and their
    token ids) is content-addressed by the teacher, the dataset and these fields only, so every
    distill stage that names it, and every edit of those stages, reuses one teacher pass.
    """

    # How the pass runs, not what it stores: never in the stage's content address.
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("batchSize",)

    top_k: int = Field(
        64,
        ge=1,
        le=4096,
        description="Largest teacher logits kept per token (at most the teacher's vocabulary). Each costs 4 bytes "
        "per token (fp16 log-probability, 16-bit token id; 6 bytes with a vocabulary over 65536).",
    )
    max_seq_length: int = Field(
        512, ge=8, le=131072, description="Tokens per window; a distill stage reading these logits uses the same."
    )
    precision: Precision = Field("auto", description="The teacher's forward pass: auto is bf16 on GPUs that support it, fp32 on CPU.")
    batch_size: int = Field(8, ge=1, le=1024, description="Windows per teacher forward pass.")
    chunk_windows: int = Field(
        256,
        ge=1,
        le=1048576,
        description="Windows per chunk. Each chunk is committed to the store as it completes; a stage that was "
        "stopped resumes after its last complete chunk.",
    )


# A variant: teacher, student or a stage's name; every one of them at most once.
Variant = Annotated[str, Field(min_length=1, max_length=STAGE_NAME_MAX)]
MAX_STAGES = 32
StageKind = Literal["distill", "quantize", "evaluate", "teacher_logits"]
MAX_VARIANTS = MAX_STAGES + len(SOURCES)


class Gates(Model):
    """Quality gates: a failed gate fails the evaluate stage with reason QualityGateFailed."""

    max_perplexity_increase: float | None = Field(
        None, ge=0, description="Largest allowed relative perplexity increase against the baseline, e.g. 0.10 for +10%."
    )
    min_tokens_per_second: float | None = Field(None, ge=0, description="Smallest allowed generation throughput.")
    max_kl_divergence: float | None = Field(
        None,
        ge=0,
        alias="maxKLDivergence",
        description="Largest allowed mean KL divergence KL(baseline || variant) of the next-token distributions, "
        "in nats per token, e.g. 0.05. A variant whose KLD cannot be measured fails this gate.",
    )
    min_top1_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        alias="minTop1Agreement",
        description="Smallest allowed share of held-out tokens where the variant's most likely next token is the "
        "baseline's, e.g. 0.9.",
    )
    min_recovery: float | None = Field(
        None,
        ge=0,
        description="Smallest allowed recovery (variant score / baseline score) on every task of evaluate.tasks "
        "(a task's own minRecovery takes its place) and on their mean, e.g. 0.95. A variant that cannot run a "
        "task fails this gate.",
    )
    applies_to: list[Variant] = Field(
        default_factory=list,
        max_length=MAX_VARIANTS,
        description="Variants the gates apply to (default: every variant but the baseline).",
    )

    @model_serializer(mode="wrap")
    def _unset_new_gates_left_out(self, handler):
        # Gates added after the first artifacts were made: unset, they stay out of the stage's digest.
        doc = handler(self)
        for key in ("minRecovery", "min_recovery"):
            if key in doc and doc[key] is None:
                del doc[key]
        return doc


# lm-eval task names: letters, digits, _ - . (e.g. arc_easy, mmlu_high_school_physics, docstring-next-word).
TASK_NAME_RE = r"^[A-Za-z0-9][-A-Za-z0-9_.]*$"
MAX_TASKS = 16


class TaskSpec(Model):
    """A task scored with lm-evaluation-harness on every variant."""

    RULES: ClassVar = (
        Rule(
            "!has(self.limit) || self.limit >= 1",
            lambda t: t.limit is None or t.limit >= 1,
            "limit 0 would score no example: leave limit out to score every example, or give at least 1",
            ".limit",
        ),
    )
    model_config = with_rules(*RULES)

    name: str = Field(
        pattern=TASK_NAME_RE,
        max_length=128,
        description="The task's name: the `task:` of a YAML definition in `uri`, else a task of lm-eval's registry "
        "(e.g. arc_easy, hellaswag).",
    )
    uri: TaskUri | None = Field(
        None,
        description="A folder (s3://, file://, pvc://) with a YAML task definition whose `task:` is `name` and its "
        "data files (dataset_path: json, dataset_kwargs.data_files relative to the YAML); or, for a registry task, a "
        "Hugging Face datasets cache holding its data. Unset: a registry task whose data is in the pod's datasets "
        "cache (read offline).",
    )
    num_fewshot: int = Field(
        0, ge=0, le=64, description="Examples of the task put before each question (from its few-shot split)."
    )
    limit: int | None = Field(
        None, description="Score at most this many examples, the first ones of the evaluated split (default: all)."
    )
    min_recovery: float | None = Field(
        None,
        ge=0,
        description="Gate on this task: smallest allowed recovery (variant score / baseline score), e.g. 0.95; "
        "overrides gates.minRecovery for it.",
    )


class EvaluateSpec(Model):
    """Evaluate variants side by side on the held-out split."""

    # How a missing variant is handled, not what is measured: the variants that were missing are in
    # the digest themselves (plan.settle).
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("onMissingVariant",)

    RULES: ClassVar = (
        Rule(
            "self.of.all(v, self.of.exists_one(w, w == v))",
            lambda e: len(set(e.of)) == len(e.of),
            "`of` lists a variant twice",
            ".of",
        ),
        Rule(
            "!has(self.baseline) || self.baseline in self.of",
            lambda e: e.baseline is None or e.baseline in e.of,
            "baseline must be one of the variants in `of`",
            ".baseline",
        ),
        Rule(
            "!has(self.gates) || !has(self.gates.appliesTo) || self.gates.appliesTo.all(v, v in self.of)",
            lambda e: all(v in e.of for v in e.gates.applies_to),
            "gates.appliesTo must name variants in `of`",
            ".gates.appliesTo",
        ),
        Rule(
            "!has(self.tasks) || self.tasks.all(t, self.tasks.exists_one(u, u.name == t.name))",
            lambda e: len({t.name for t in e.tasks}) == len(e.tasks),
            "`tasks` lists a task twice",
            ".tasks",
        ),
        Rule(
            "!has(self.gates) || !has(self.gates.minRecovery) || (has(self.tasks) && self.tasks.size() > 0)",
            lambda e: e.gates.min_recovery is None or bool(e.tasks),
            "gates.minRecovery needs tasks: recovery is a task score over the baseline's",
            ".gates.minRecovery",
        ),
    )
    model_config = with_rules(*RULES)
    # A field added later, at its neutral value, moves no digest made before it existed (plan._identity).
    NOT_IN_DIGEST: ClassVar[dict[str, tuple]] = {"tasks": ([],)}

    of: list[Variant] = Field(
        min_length=1, max_length=MAX_VARIANTS, description="Variants: teacher, student or stage names."
    )
    baseline: Variant | None = Field(
        None, description="Variant the gates compare against (default: the first of `of`)."
    )
    gates: Gates = Field(default_factory=Gates, description="Quality gates.")
    on_missing_variant: Literal["fail", "skip"] = Field(
        "fail",
        description="When a stage named in `of` failed (or could not run): fail leaves evaluate blocked; skip "
        "evaluates the variants that exist and lists the missing ones in the report with their stage's reason. "
        "The baseline is never skipped.",
    )
    seq_length: int = Field(256, ge=8, le=131072, description="Perplexity window in tokens (identical for every variant).")
    max_eval_tokens: int = Field(65536, ge=64, description="Evaluate on at most this many held-out tokens.")
    generate_tokens: int = Field(
        32, ge=2, le=4096,
        description="New tokens each prompt generates when speed is timed (greedy; EOS does not stop it): the first "
        "comes from the prefill, the others are decode steps.",
    )
    prompt_tokens: int = Field(
        64, ge=1, le=32768,
        description="Prompt length when speed is timed: every variant gets the same token ids, cut from the held-out split.",
    )
    speed_batch: int = Field(
        8, ge=2, le=1024,
        description="The larger batch at which prefill and decode tokens/s are timed (besides batch 1); it also "
        "sets the peak runtime memory reported.",
    )
    tasks: list[TaskSpec] = Field(
        default_factory=list,
        max_length=MAX_TASKS,
        description="Tasks scored with lm-evaluation-harness on every variant (GGUF through llama.cpp): each "
        "variant's score with its standard error and its recovery, the score over the baseline's.",
    )


class Stage(Model):
    """One step of the pipeline. Exactly one of distill, quantize, evaluate, teacherLogits."""

    RULES: ClassVar = (
        one_of("distill", "quantize", "evaluate", "teacher_logits"),
        Rule(
            f"!(self.name in {list(SOURCES)})",
            lambda s: s.name not in SOURCES,
            "teacher and student name the pipeline's sources: give the stage another name",
            ".name",
        ),
        Rule(
            "!has(self.evaluate) || !has(self.from)",
            lambda s: s.evaluate is None or s.from_ is None,
            "evaluate takes its inputs from evaluate.of, not from",
            ".from",
        ),
        Rule(
            "!has(self.teacherLogits) || !has(self.from)",
            lambda s: s.teacher_logits is None or s.from_ is None,
            "teacherLogits runs spec.teacher, not from",
            ".from",
        ),
    )
    model_config = with_rules(*RULES)

    name: str = Field(
        pattern=STAGE_NAME_RE,
        max_length=STAGE_NAME_MAX,
        description="Stage name: lowercase letters, digits and '-', unique in the pipeline.",
    )
    from_: str | None = Field(
        None,
        alias="from",
        max_length=STAGE_NAME_MAX,
        description="Input of the stage: an earlier stage, `teacher` or `student`. Default: the previous stage "
        "(the student for the first one). Unused by evaluate, which names its inputs in `of`.",
    )
    distill: DistillSpec | None = Field(None, description="Distil the teacher into the student.")
    quantize: QuantizeSpec | None = Field(None, description="Quantize the input model.")
    evaluate: EvaluateSpec | None = Field(None, description="Evaluate variants side by side.")
    teacher_logits: TeacherLogitsSpec | None = Field(
        None,
        description="Run the teacher once over the training windows and store its top-k logits, for distill "
        "stages that name this stage in distill.teacherLogits.",
    )
    resources: Resources | None = Field(
        None,
        description="Fields set here override spec.resources for this stage (the others are inherited).",
        json_schema_extra={"x-kondense-inherits": "spec.resources"},
    )

    @property
    def kind(self) -> StageKind:
        if self.teacher_logits:
            return "teacher_logits"
        return "distill" if self.distill else "quantize" if self.quantize else "evaluate"

    @property
    def config(self) -> DistillSpec | QuantizeSpec | EvaluateSpec | TeacherLogitsSpec:
        return self.distill or self.quantize or self.evaluate or self.teacher_logits  # type: ignore[return-value]

    @property
    def method(self) -> str:
        """The distill or quantize method; `evaluate` or `top-k` for the other kinds."""
        if self.teacher_logits:
            return "top-k"
        return self.distill.method if self.distill else self.quantize.method if self.quantize else "evaluate"


# How stages name each other, checked across the list at admission. The same checks, with the index
# of the stage in each message, are plan.semantic_errors (`kondense validate` and the operator).
# "Earlier" needs positions, which CEL lists give only by index: i and j run over a literal list of
# every possible index. The API server's cost estimate cannot bound a list built by map() (so
# neither map(...).indexOf() nor map(...).filter() fits its budget) but it bounds these literals.
# Each index is tested before it is used, through ?: (which evaluates one branch), not ||.
_INDICES = str(list(range(MAX_STAGES)))


_S = "self.stages[i]"


def _each_stage(condition: str) -> str:
    """`condition` holds for every stage, _S at index i."""
    return f"{_INDICES}.all(i, i < self.stages.size() ? ({condition}) : true)"


def _earlier(name: str, condition: str = "true") -> str:
    """`name` is the name of a stage before index i (for which `condition` on self.stages[j] holds)."""
    return f"{_INDICES}.exists(j, j < i ? self.stages[j].name == {name} && {condition} : false)"


STAGE_REFERENCES = [
    cel(
        "self.stages.all(s, self.stages.exists_one(t, t.name == s.name))",
        "stage names must be unique",
        ".stages",
    ),
    cel(
        _each_stage(f"!has({_S}.from) || {_S}.from in {list(SOURCES)} || {_earlier(f'{_S}.from')}"),
        "a stage's `from` must name an earlier stage, teacher or student",
        ".stages",
    ),
    cel(
        "self.stages.all(s, !has(s.from) || !self.stages.exists(t, t.name == s.from && !has(t.distill)))",
        "a stage's `from` must name teacher, student or a distill stage (the stages that make a full model)",
        ".stages",
    ),
    cel(
        _each_stage(f"!has({_S}.evaluate) || {_S}.evaluate.of.all(v, v in {list(SOURCES)} || {_earlier('v')})"),
        "evaluate.of must name teacher, student or earlier stages",
        ".stages",
    ),
    cel(
        "self.stages.all(s, !has(s.evaluate) || s.evaluate.of.all(v, "
        "!self.stages.exists(t, t.name == v && (has(t.evaluate) || has(t.teacherLogits)))))",
        "evaluate.of must name models: teacher, student, distill or quantize stages",
        ".stages",
    ),
    cel(
        _each_stage(
            f"!has({_S}.distill) || !has({_S}.distill.teacherLogits) || "
            + _earlier(f"{_S}.distill.teacherLogits", "has(self.stages[j].teacherLogits)")
        ),
        "distill.teacherLogits must name an earlier teacherLogits stage",
        ".stages",
    ),
    cel(
        "self.stages.all(s, !has(s.distill) || !has(s.distill.teacherLogits) || !self.stages.exists(t, "
        "t.name == s.distill.teacherLogits && has(t.teacherLogits) "
        "&& t.teacherLogits.maxSeqLength != s.distill.maxSeqLength))",
        "a distill stage's maxSeqLength must equal that of the teacherLogits stage it reads (its windows)",
        ".stages",
    ),
]
# The pipeline's name, checked at the CRD's root, where CEL sees metadata.name: ObjectMeta.name's rule.
NAME_RULES = [
    cel(
        f"self.metadata.name.size() <= {PIPELINE_NAME_MAX} && self.metadata.name.matches(r'{PIPELINE_NAME_RE}')",
        f"metadata.name must be at most {PIPELINE_NAME_MAX} lowercase letters, digits and '-' "
        "(it prefixes the names of the stage Jobs)",
    ),
]


class PipelineSpec(Model):
    """Distil a teacher into a student, quantize it, evaluate the variants."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": STAGE_REFERENCES})

    teacher: ModelRef = Field(description="The large model to distil from.")
    student: ModelRef = Field(description="Initial student weights (a smaller model sharing the teacher's tokenizer).")
    dataset: DatasetRef = Field(description="Prompts/text for training, calibration and evaluation.")
    storage: Storage = Field(description="Where every checkpoint and report is staged.")
    resources: Resources = Field(default_factory=Resources, description="Default resources of every stage.")
    image: str | None = Field(
        None,
        pattern=r"^\S+$",
        max_length=512,
        description="Jobs image (default: the operator's configured jobs image).",
    )
    stages: list[Stage] = Field(min_length=1, max_length=MAX_STAGES, description="The stages, in order.")

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


class ObjectMeta(Model):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=PIPELINE_NAME_RE, max_length=PIPELINE_NAME_MAX)
    namespace: str = "default"
    generation: int | None = None


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------

StageState = Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"]


class Condition(Model):
    """A metav1.Condition."""

    type: str = Field(description="Ready, Succeeded, Progressing, Failed or QualityGatePassed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason.")
    message: str = Field("", description="Human-readable details.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="Generation the condition was computed for.")


class Artifact(Model):
    """A committed artifact in the store."""

    uri: str = Field(description="Folder (or file) of the artifact.")
    digest: str = Field(description="sha256 over the artifact's file digests.")
    size_bytes: int = Field(0, description="Total size of the artifact's files.")


class StageStatus(Model):
    """Where one stage stands."""

    name: str = Field(description="Stage name.")
    state: StageState = Field("Pending", description="Pending, Running, Succeeded, Failed or Skipped.")
    input_digest: str | None = Field(None, description="Content address of the stage's spec and inputs.")
    run_digest: str | None = Field(
        None,
        description="Digest of what shaped the stage's pod (resources, image, storage access) and the "
        "pipeline's kondense.io/retry annotation: when it changes, a failed stage runs again.",
    )
    job: str | None = Field(None, description="Name of the stage's Job (cluster runs).")
    attempts: int = Field(0, description="Pods started for the current input digest.")
    started_at: str | None = Field(None, description="When the current attempt started.")
    finished_at: str | None = Field(None, description="When the stage finished.")
    progress: str | None = Field(None, description="Last progress, e.g. 120/500 steps.")
    artifact: Artifact | None = Field(None, description="The stage's committed output.")
    metrics: dict[str, float] | None = Field(None, description="Numbers the stage reported.")
    reason: str | None = Field(None, description="CamelCase reason of the current state.")
    message: str | None = Field(None, description="Details and a hint when failed.")


class ReportRow(Model):
    variant: str = Field(description="teacher, student or a stage name.")
    size_bytes: int | None = Field(None, description="Size on disk (none for a variant not evaluated).")
    parameters: int | None = Field(None, description="Parameter count.")
    perplexity: float | None = Field(None, description="Perplexity on the held-out split.")
    tokens_per_second: float | None = Field(
        None, description="Decode tokens/s at batch 1 (the speed entries have prefill and the larger batch)."
    )
    kl_divergence: float | None = Field(
        None,
        alias="klDivergence",
        description="Mean KL(baseline || variant) of the next-token distributions on the held-out tokens (nats).",
    )
    top1_agreement: float | None = Field(
        None, alias="top1Agreement", description="Share of held-out tokens where the variant's argmax is the baseline's."
    )
    note: str | None = Field(None, description="Why a number is missing (n/a).")
    missing: str | None = Field(
        None, description="Not evaluated (evaluate.onMissingVariant: skip): the reason of the stage that failed."
    )
    tasks: list[TaskScoreRow] | None = Field(None, description="Task scores, in evaluate.tasks order.")
    recovery: float | None = Field(
        None, description="Mean over the tasks of the recovery (score / the baseline's score); none when one is n/a."
    )
    memory_bytes: int | None = Field(
        None, description="Peak runtime memory while generating at the larger batch, above the process before loading."
    )
    engine: str | None = Field(None, description="What ran the variant for speed: transformers or llama.cpp, and on what.")
    batch: int | None = Field(None, description="The larger batch speed was timed at (evaluate.speedBatch).")
    batch_tokens_per_second: float | None = Field(
        None, description="Decode tokens/s at `batch` (report.json has prefill and decode at every batch size)."
    )


class TaskScoreRow(Model):
    """One variant's score on one task."""

    task: str = Field(description="Task name.")
    score: float | None = Field(None, description="The task's metric (e.g. acc, exact_match).")
    stderr: float | None = Field(None, description="Standard error of the score (lm-eval's).")
    recovery: float | None = Field(None, description="score / the baseline's score on this task.")
    note: str | None = Field(None, description="Why the score or the recovery is n/a.")


class Report(Model):
    """Summary of the evaluate stage."""

    uri: str = Field(description="Folder with report.json, report.md and plot.png.")
    baseline: str | None = Field(None, description="Variant the gates compared against.")
    table: list[ReportRow] = Field(default_factory=list, description="One row per variant.")
    best: str | None = Field(
        None, description="The smallest variant that passed every gate applied to it (teacher and student aside)."
    )
    best_size_ratio: float | None = Field(None, description="The best variant's size over sizeReference's.")
    size_reference: str | None = Field(None, description="teacher when it was evaluated, else the baseline.")


class PipelineStatus(Model):
    """Where the run stands, stage by stage."""

    observed_generation: int | None = Field(None, description="Generation of the spec this status describes.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Succeeded, Progressing, Failed, QualityGatePassed.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    stage: str | None = Field(None, description="The stage currently running (or the last one).")
    progress: str | None = Field(None, description="Stages done out of all, e.g. 2/5.")
    stages: list[StageStatus] = Field(
        default_factory=list,
        description="Per-stage status, in spec order.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    report: Report | None = Field(None, description="The evaluation report, once evaluate succeeded.")


class CompressionPipeline(Model):
    """The whole resource as `kubectl apply` and `kondense run` read it."""

    api_version: Literal["kondense.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["CompressionPipeline"] = KIND
    metadata: ObjectMeta
    spec: PipelineSpec
    status: PipelineStatus | None = None


# --------------------------------------------------------------------------------------------
# What a stage's process receives and returns
# --------------------------------------------------------------------------------------------


class InputRef(Model):
    """A stage input: an external source or an earlier stage's committed artifact."""

    uri: str = Field(description="Folder (or .gguf file's folder) of the input.")
    revision: str | None = None
    stage: str | None = Field(None, description="Producing stage; None for teacher/student sources.")
    input_digest: str | None = Field(None, description="Expected inputDigest in the artifact's manifest.json.")


class StageRun(Model):
    """The document a stage process reads (`--spec stage.json`): everything, no credentials."""

    api_version: Literal["kondense.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["StageRun"] = "StageRun"
    pipeline: str
    namespace: str
    stage: str
    stage_kind: StageKind
    distill: DistillSpec | None = None
    quantize: QuantizeSpec | None = None
    evaluate: EvaluateSpec | None = None
    teacher_logits: TeacherLogitsSpec | None = None
    missing: dict[str, str] = Field(
        default_factory=dict,
        description="evaluate with onMissingVariant skip: variants of `of` that do not exist, each with its "
        "stage's reason; they have no entry in `models`.",
    )
    models: dict[str, InputRef] = Field(
        description="distill: teacher (or teacherLogits), student; quantize: model; evaluate: every variant "
        "by name, in order; teacher_logits: teacher."
    )
    dataset: DatasetRef
    output: str = Field(description="Folder to publish into; manifest.json is written last.")
    input_digest: str
    storage: Storage
    resources: Resources

    @property
    def config(self) -> DistillSpec | QuantizeSpec | EvaluateSpec | TeacherLogitsSpec:
        return getattr(self, self.stage_kind)

    @property
    def sharded(self) -> bool:
        """A distill stage whose student is sharded with FSDP (distill.strategy: fsdp)."""
        return self.distill is not None and self.distill.strategy == "fsdp"


class Summary(Model):
    """A stage's one-line result: the termination message and the last stdout line."""

    state: Literal["Succeeded", "Failed"]
    reason: str
    message: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    artifact: Artifact | None = None
    report: Report | None = None

