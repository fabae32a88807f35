"""The CompressionPipeline API: spec and status models, the single source of truth.

The CRD in crds/ is generated from these models (`kondense crd`), the local runner parses the
same YAML with them, and the document handed to a stage's Job (`StageRun`) is built from them.
Field names are camelCase on the wire and snake_case in Python.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
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


class Model(BaseModel):
    """Base for every API object: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def dump(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------

Uri = Annotated[
    str,
    Field(
        pattern=r"^(s3|file|pvc|hf)://.+",
        description="Where the files live: s3://bucket/prefix, file:///abs/path, pvc://claim/path or "
        "hf://org/name (revision in `revision`).",
    ),
]


class ModelRef(Model):
    """A model in Hugging Face layout (config.json, tokenizer, safetensors)."""

    uri: Uri
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hf:// URIs.")


class DatasetRef(Model):
    """A JSON Lines file (or a folder of them): one record per line."""

    uri: Uri
    text_field: str = Field("text", description="Record field holding the training and evaluation text.")
    prompt_field: str = Field(
        "prompt",
        description="Record field holding a prompt, for synthetic and gkd distillation. Records without it "
        "use the first `promptTokens` tokens of the text as the prompt.",
    )
    prompt_tokens: int = Field(32, ge=1, le=4096, description="Prompt length taken from text when a record has no prompt.")
    eval_split: float = Field(
        0.05, gt=0, lt=1, description="Fraction of records held out for evaluation (the same split in every stage)."
    )
    max_samples: int | None = Field(None, ge=1, description="Use at most this many records (after shuffling with `seed`).")
    seed: int = Field(0, ge=0, description="Seed of the shuffle that makes the train/eval split.")


class Storage(Model):
    """Where every stage's artifacts are staged."""

    uri: Annotated[str, Field(pattern=r"^(s3|file)://.+", description="s3://bucket/prefix or file:///abs/path.")]
    endpoint: str | None = Field(None, description="S3 endpoint URL for S3-compatible stores (MinIO, Ceph, ...).")
    region: str | None = Field(None, description="S3 region; defaults to the AWS environment of the pod.")
    credentials_secret: str | None = Field(
        None,
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


def _one_of(model: BaseModel, *fields: str) -> None:
    """Mirrors the CEL rule `exactly one of ... must be set` of a core/v1 union."""
    if sum(getattr(model, f) is not None for f in fields) != 1:
        raise ValueError(f"exactly one of {', '.join(to_camel(f) for f in fields)} must be set")


def _one_of_rule(*fields: str) -> dict[str, str]:
    camel = [to_camel(f) for f in fields]
    return cel(
        f"[{', '.join(f'has(self.{c})' for c in camel)}].filter(x, x).size() == 1",
        f"exactly one of {', '.join(camel)} must be set",
    )


class KeySelector(Model):
    """A core/v1 SecretKeySelector or ConfigMapKeySelector: a key of an object in the pipeline's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret or ConfigMap.")
    key: str = Field(min_length=1, max_length=253, description="The key whose value the variable takes.")
    optional: bool | None = Field(
        None, description="Start the pod even when the object or key is missing (default false)."
    )


class EnvVarSource(Model):
    """Where a variable's value comes from: a key of a Secret or of a ConfigMap."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _one_of_rule("secret_key_ref", "config_map_key_ref")]})

    secret_key_ref: KeySelector | None = Field(
        None, description="A key of a Secret in the pipeline's namespace."
    )
    config_map_key_ref: KeySelector | None = Field(
        None, description="A key of a ConfigMap in the pipeline's namespace."
    )

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        _one_of(self, "secret_key_ref", "config_map_key_ref")
        return self


class EnvVar(Model):
    """A core/v1 EnvVar of the stage container: a value, or a Secret's or ConfigMap's key (`valueFrom`)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        cel("!has(self.value) || !has(self.valueFrom)", "value and valueFrom are exclusive"),
        cel(
            f"!(self.name in [{', '.join(repr(n) for n in RESERVED_ENV)}]) "
            f"&& !self.name.startsWith('{RESERVED_ENV_PREFIX}')",
            RESERVED_ENV_MESSAGE,
            ".name",
        ),
    ]})

    name: str = Field(min_length=1, max_length=256, description="Variable name, e.g. HF_TOKEN.")
    value: str | None = Field(None, description="The value; $(VAR) names a variable defined before it.")
    value_from: EnvVarSource | None = Field(
        None, description="Take the value from a Secret's or a ConfigMap's key."
    )

    @model_validator(mode="after")
    def _valid(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("value and valueFrom are exclusive")
        if self.name in RESERVED_ENV or self.name.startswith(RESERVED_ENV_PREFIX):
            raise ValueError(f"{self.name}: {RESERVED_ENV_MESSAGE}")
        return self


class ObjectRef(Model):
    """A core/v1 SecretEnvSource or ConfigMapEnvSource."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret or ConfigMap.")
    optional: bool | None = Field(None, description="Start the pod even when it is missing (default false).")


class EnvFromSource(Model):
    """A core/v1 EnvFromSource: every key of a Secret or ConfigMap as a variable."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        _one_of_rule("secret_ref", "config_map_ref")]})

    prefix: str | None = Field(None, max_length=256, description="Prepended to every key.")
    secret_ref: ObjectRef | None = Field(None, description="A Secret in the pipeline's namespace.")
    config_map_ref: ObjectRef | None = Field(None, description="A ConfigMap in the pipeline's namespace.")

    @model_validator(mode="after")
    def _one_source(self) -> EnvFromSource:
        _one_of(self, "secret_ref", "config_map_ref")
        return self


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

    key: str = Field(min_length=1, description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In, NotIn, Exists or DoesNotExist."
    )
    values: list[str] | None = Field(None, description="Values for In and NotIn.")


class LabelSelector(Model):
    """A metav1.LabelSelector."""

    match_labels: dict[str, str] | None = Field(None, description="Labels a pod must have.")
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        None, description="Requirements a pod must meet."
    )


class TopologySpreadConstraint(Model):
    """A core/v1 TopologySpreadConstraint over the stage pods."""

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
        80, gt=0, alias="gpuMemoryGiB", description="Memory of one GPU, used by the preflight estimate (80 for an H100 80GB)."
    )
    cpu: Quantity | None = Field(None, description="CPU request and limit.")
    memory: Quantity | None = Field(None, description="Memory request and limit.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pod must match.")
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Extra tolerations; with gpus > 0 the pod also tolerates the nvidia.com/gpu taint and "
        "one named like gpuResource.",
    )
    priority_class_name: str | None = Field(None, description="PriorityClass of the stage pods.")
    queue_name: str | None = Field(None, description="Kueue LocalQueue: sets the kueue.x-k8s.io/queue-name label.")
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
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
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

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!has(self.maxSteps) || self.maxSteps > 0", "maxSteps must be positive"),
                cel(
                    "!has(self.globalBatchSize) || self.globalBatchSize % self.batchSize == 0",
                    "globalBatchSize must be a multiple of batchSize",
                    ".globalBatchSize",
                ),
                cel(
                    "!has(self.teacherLoad) || self.teacherLoad != 'sharded' || self.method == 'logits'",
                    "teacherLoad sharded is only for method logits",
                    ".teacherLoad",
                ),
                cel(
                    "!has(self.strategy) || self.strategy != 'fsdp' || self.method != 'gkd'",
                    "strategy fsdp is not for method gkd (its on-policy generation would gather the student for every token)",
                    ".strategy",
                ),
            ]
        }
    )

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
    max_steps: int | None = Field(None, description="Optimizer steps; overrides epochs.")
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
    seed: int = Field(42, ge=0, description="Seed of initialisation, shuffling and sampling.")
    checkpoint_every: int = Field(
        100, ge=1, description="Steps between checkpoints staged in the store; a restarted stage resumes from the newest."
    )
    max_new_tokens: int = Field(128, ge=1, le=8192, description="synthetic and gkd: tokens generated per prompt.")
    generation_temperature: float = Field(0.7, ge=0, le=5, description="synthetic and gkd: sampling temperature (0 = greedy).")
    top_p: float = Field(0.95, gt=0, le=1, description="synthetic: nucleus sampling threshold.")

    @model_validator(mode="after")
    def _consistent(self) -> DistillSpec:  # mirrors the CEL rules above for `kondense validate`
        if self.global_batch_size is not None and self.global_batch_size % self.batch_size:
            raise ValueError(
                f"globalBatchSize {self.global_batch_size} must be a multiple of batchSize {self.batch_size}"
            )
        if self.teacher_load == "sharded" and self.method != "logits":
            raise ValueError("teacherLoad sharded is only for method logits")
        if self.strategy == "fsdp" and self.method == "gkd":
            raise ValueError(
                "strategy fsdp is not for method gkd (its on-policy generation would gather the student for every token)"
            )
        return self

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on `world_size` workers."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        return max(1, self.global_batch_size // (self.batch_size * world_size))

    def global_batch(self, world_size: int) -> int:
        return self.global_batch_size or self.batch_size * self.gradient_accumulation_steps * world_size


class QuantizeSpec(Model):
    """Quantize a model. Fields that a method does not use are rejected."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!has(self.type) || self.method == 'gguf'", "type is only for method gguf", ".type"),
                cel("!has(self.bits) || self.method == 'gptq'", "bits is only for method gptq", ".bits"),
                cel("!has(self.groupSize) || self.method == 'gptq'", "groupSize is only for method gptq", ".groupSize"),
                cel("!has(self.groupSize) || self.groupSize != 0", "groupSize must be -1 (per channel) or positive", ".groupSize"),
                cel(
                    "!has(self.doubleQuant) || self.method == 'bnb-nf4'",
                    "doubleQuant is only for method bnb-nf4",
                    ".doubleQuant",
                ),
            ]
        }
    )

    method: Literal["bnb-nf4", "bnb-int8", "gptq", "gguf"] = Field(
        description="bnb-nf4 / bnb-int8: bitsandbytes via transformers; gptq: GPTQ W{bits}A16 via llm-compressor "
        "(compressed-tensors format, loads in vLLM and transformers); gguf: llama.cpp's converter and quantizer."
    )
    bits: Literal[2, 3, 4, 8] | None = Field(None, description="gptq: weight bits (default 4).")
    group_size: int | None = Field(None, ge=-1, le=4096, description="gptq: columns per quantization group, -1 for per-channel (default 128).")
    calibration_samples: int = Field(128, ge=1, le=100000, description="gptq: calibration records drawn from the training split.")
    calibration_seq_length: int = Field(512, ge=8, le=131072, description="gptq: tokens per calibration sample.")
    double_quant: bool | None = Field(None, description="bnb-nf4: quantize the quantization constants too (default true).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="bnb: dtype of the matmuls on dequantized weights."
    )
    type: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k"] | None = Field(
        None, description="gguf: llama.cpp file type (default q8_0)."
    )

    # Mirrors the CEL rules above, so `kondense validate` says what the API server would.
    METHOD_FIELDS: ClassVar[dict[str, str]] = {"type": "gguf", "bits": "gptq", "group_size": "gptq", "double_quant": "bnb-nf4"}

    @model_validator(mode="after")
    def _fields_of_method(self) -> QuantizeSpec:
        for name, method in self.METHOD_FIELDS.items():
            if getattr(self, name) is not None and self.method != method:
                raise ValueError(f"{to_camel(name)} is only for method {method}")
        if self.group_size == 0:
            raise ValueError("groupSize must be -1 (per channel) or positive")
        return self


class Gates(Model):
    """Quality gates: a failed gate fails the evaluate stage with reason QualityGateFailed."""

    max_perplexity_increase: float | None = Field(
        None, ge=0, description="Largest allowed relative perplexity increase against the baseline, e.g. 0.10 for +10%."
    )
    min_tokens_per_second: float | None = Field(None, ge=0, description="Smallest allowed generation throughput.")
    applies_to: list[str] = Field(
        default_factory=list, description="Variants the gates apply to (default: every variant but the baseline)."
    )


class EvaluateSpec(Model):
    """Evaluate variants side by side on the held-out split."""

    of: list[str] = Field(min_length=1, description="Variants: teacher, student or stage names.")
    baseline: str | None = Field(None, description="Variant the gates compare against (default: the first of `of`).")
    gates: Gates = Field(default_factory=Gates, description="Quality gates.")
    seq_length: int = Field(256, ge=8, le=131072, description="Perplexity window in tokens (identical for every variant).")
    max_eval_tokens: int = Field(65536, ge=64, description="Evaluate on at most this many held-out tokens.")
    generate_tokens: int = Field(32, ge=1, le=4096, description="Tokens generated to measure tokens/s.")


class Stage(Model):
    """One step of the pipeline. Exactly one of distill, quantize, evaluate."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "[has(self.distill), has(self.quantize), has(self.evaluate)].filter(x, x).size() == 1",
                    "exactly one of distill, quantize, evaluate must be set",
                ),
            ]
        }
    )

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
    resources: Resources | None = Field(
        None,
        description="Fields set here override spec.resources for this stage (the others are inherited).",
        json_schema_extra={"x-kondense-inherits": "spec.resources"},
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Stage:
        if sum(x is not None for x in (self.distill, self.quantize, self.evaluate)) != 1:
            raise ValueError("exactly one of distill, quantize, evaluate must be set")
        return self

    @property
    def kind(self) -> Literal["distill", "quantize", "evaluate"]:
        return "distill" if self.distill else "quantize" if self.quantize else "evaluate"

    @property
    def config(self) -> DistillSpec | QuantizeSpec | EvaluateSpec:
        return self.distill or self.quantize or self.evaluate  # type: ignore[return-value]


class PipelineSpec(Model):
    """Distil a teacher into a student, quantize it, evaluate the variants."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.stages.all(s, self.stages.exists_one(t, t.name == s.name))",
                    "stage names must be unique",
                    ".stages",
                ),
                cel(
                    "self.stages.all(s, !has(s.from) || s.from in ['teacher', 'student'] "
                    "|| self.stages.exists(t, t.name == s.from))",
                    "a stage's `from` must name another stage, teacher or student",
                    ".stages",
                ),
            ]
        }
    )

    teacher: ModelRef = Field(description="The large model to distil from.")
    student: ModelRef = Field(description="Initial student weights (a smaller model sharing the teacher's tokenizer).")
    dataset: DatasetRef = Field(description="Prompts/text for training, calibration and evaluation.")
    storage: Storage = Field(description="Where every checkpoint and report is staged.")
    resources: Resources = Field(default_factory=Resources, description="Default resources of every stage.")
    image: str | None = Field(None, description="Jobs image (default: the operator's configured jobs image).")
    stages: list[Stage] = Field(min_length=1, max_length=32, description="The stages, in order.")

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


class ObjectMeta(Model):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
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
    metrics: dict[str, float] = Field(default_factory=dict, description="Numbers the stage reported.")
    reason: str | None = Field(None, description="CamelCase reason of the current state.")
    message: str | None = Field(None, description="Details and a hint when failed.")


class ReportRow(Model):
    variant: str = Field(description="teacher, student or a stage name.")
    size_bytes: int = Field(description="Size on disk.")
    parameters: int | None = Field(None, description="Parameter count.")
    perplexity: float | None = Field(None, description="Perplexity on the held-out split.")
    tokens_per_second: float | None = Field(None, description="Generation throughput.")


class Report(Model):
    """Summary of the evaluate stage."""

    uri: str = Field(description="Folder with report.json, report.md and plot.png.")
    baseline: str | None = Field(None, description="Variant the gates compared against.")
    table: list[ReportRow] = Field(default_factory=list, description="One row per variant.")


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
    stage_kind: Literal["distill", "quantize", "evaluate"]
    distill: DistillSpec | None = None
    quantize: QuantizeSpec | None = None
    evaluate: EvaluateSpec | None = None
    models: dict[str, InputRef] = Field(
        description="distill: teacher, student; quantize: model; evaluate: every variant by name, in order."
    )
    dataset: DatasetRef
    output: str = Field(description="Folder to publish into; manifest.json is written last.")
    input_digest: str
    storage: Storage
    resources: Resources

    @property
    def config(self) -> DistillSpec | QuantizeSpec | EvaluateSpec:
        return getattr(self, self.stage_kind)


class Summary(Model):
    """A stage's one-line result: the termination message and the last stdout line."""

    state: Literal["Succeeded", "Failed"]
    reason: str
    message: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    artifact: Artifact | None = None
    report: Report | None = None

