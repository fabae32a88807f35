"""The plan: pure functions from a spec and what is known of its stages to the next actions.

No I/O here. The local runner and the operator both call `resolve` (the DAG with content
addresses) and `decide` (what is done, what can start), then act on the answer themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

from pydantic.alias_generators import to_camel

from kondense.api import SOURCES, InputRef, ModelRef, PipelineSpec, Resources, Stage, StageRun
from kondense.errors import InvalidSpec
from kondense.store import artifact_uri, dumps_canonical

# Bump when the meaning of a stage's output changes for the same spec (forces recompute).
DIGEST_VERSION = 1

MODEL_PRODUCERS = {"distill"}  # stages whose output is a trainable HF model
VARIANT_PRODUCERS = {"distill", "quantize"}  # stages whose output can be evaluated
TEACHER_LOGITS = "teacher_logits"  # the stage kind whose artifact distill.teacherLogits reads


@dataclass(frozen=True)
class StagePlan:
    """One stage with its inputs resolved and its content address computed."""

    name: str
    kind: str
    index: int
    inputs: dict[str, str]  # role -> "teacher" | "student" | stage name
    input_digest: str
    output: str
    resources: Resources
    # Inputs the stage may run without (evaluate with onMissingVariant: skip: every variant but the
    # baseline), and those it runs without, once `settle` knows they failed or cannot run.
    optional: frozenset[str] = frozenset()
    missing: tuple[str, ...] = ()

    @property
    def upstream(self) -> list[str]:
        return [v for v in self.inputs.values() if v not in SOURCES]


def _path(i: int, *rest: str) -> str:
    return ".".join([f"spec.stages[{i}]", *rest])


def semantic_errors(spec: PipelineSpec) -> list[str]:
    """References between stages (the CRD's rules api.STAGE_REFERENCES, here with the stage's
    index) and what needs a stage's effective resources. Each message names its field."""
    errors: list[str] = []
    kinds: dict[str, tuple[int, str]] = {}
    for i, stage in enumerate(spec.stages):
        if stage.name in kinds:
            errors.append(f"{_path(i, 'name')}: duplicate stage name {stage.name!r} (also spec.stages[{kinds[stage.name][0]}])")
        kinds.setdefault(stage.name, (i, stage.kind))

    def check_ref(i: int, where: str, ref: str, allowed: set[str], what: str) -> None:
        if ref in SOURCES:
            return
        if ref not in kinds:
            known = ", ".join([*SOURCES, *kinds]) or "none"
            errors.append(f"{_path(i, where)}: {ref!r} names no stage (known: {known})")
        elif kinds[ref][0] >= i:
            errors.append(f"{_path(i, where)}: {ref!r} must be an earlier stage (stages run in DAG order; no cycles)")
        elif kinds[ref][1] not in allowed:
            errors.append(f"{_path(i, where)}: {ref!r} is a {kinds[ref][1]} stage; {what}")

    for i, stage in enumerate(spec.stages):
        errors += resource_errors(spec, i)
        if stage.kind == "evaluate":  # its own fields (no `from`, baseline in `of`) are the model's rules
            ev = stage.evaluate
            assert ev is not None
            for j, name in enumerate(ev.of):
                check_ref(i, f"evaluate.of[{j}]", name, VARIANT_PRODUCERS, "only models can be evaluated")
        elif stage.from_:
            what = "a distill stage starts from a model, not a quantized one"
            if stage.kind == "quantize":
                what = "quantize takes a full-precision model (teacher, student or a distill stage)"
            check_ref(i, "from", stage.from_, MODEL_PRODUCERS, what)
        if stage.distill and stage.distill.teacher_logits:
            ref = stage.distill.teacher_logits
            if ref in SOURCES:
                errors.append(f"{_path(i, 'distill.teacherLogits')}: {ref!r} is a source; name a teacherLogits stage")
            else:
                check_ref(i, "distill.teacherLogits", ref, {TEACHER_LOGITS}, "name a teacherLogits stage")
            errors += _window_errors(spec, i, kinds)
    return errors


def _window_errors(spec: PipelineSpec, i: int, kinds: dict[str, tuple[int, str]]) -> list[str]:
    """A distill stage trains on the windows of the teacherLogits stage it reads: same length."""
    d = spec.stages[i].distill
    assert d is not None and d.teacher_logits is not None
    j, kind = kinds.get(d.teacher_logits, (i, ""))
    if kind != TEACHER_LOGITS or j >= i:
        return []  # check_ref said why
    source = spec.stages[j].teacher_logits
    assert source is not None
    if source.max_seq_length == d.max_seq_length:
        return []
    return [
        f"{_path(i, 'distill.maxSeqLength')}: {d.max_seq_length}, but stage {d.teacher_logits!r} stores windows of "
        f"{source.max_seq_length} tokens (its teacherLogits.maxSeqLength); set both to the same"
    ]


def _resource_path(spec: PipelineSpec, i: int, name: str) -> str:
    """Where an effective resource field comes from: the stage's own resources, else spec.resources."""
    own = spec.stages[i].resources
    if own is not None and name in own.model_fields_set:
        return _path(i, "resources", to_camel(name))
    return f"spec.resources.{to_camel(name)}"


def resource_errors(spec: PipelineSpec, i: int) -> list[str]:
    """What the stage's effective resources decide: workers, nodes, the global batch, GPU-only methods."""
    stage, r = spec.stages[i], effective_resources(spec, spec.stages[i])
    errors: list[str] = []
    if stage.kind == "quantize" and stage.quantize is not None and stage.quantize.method == "awq" and not r.gpus:
        errors.append(
            f"{_path(i, 'quantize.method')}: awq runs on GPUs only (llm-compressor's AWQ pins its cached "
            "activations in page-locked memory, which needs an NVIDIA driver); set resources.gpus on this "
            "stage, or use method gptq (bits 4) on CPUs"
        )
    if stage.kind != "distill":
        for name, value in (("nodes", r.nodes), ("workers", r.workers or 1)):
            if value > 1:
                errors.append(
                    f"{_resource_path(spec, i, name)}: {value}, but only distill stages run several workers; "
                    f"a {stage.kind} stage uses its pod's GPUs from one process. Set {to_camel(name)} on the distill "
                    "stage's own resources instead"
                )
        return errors
    d = stage.distill
    assert d is not None
    if r.workers is not None and r.gpus and r.workers != r.gpus:
        errors.append(
            f"{_resource_path(spec, i, 'workers')}: {r.workers} workers on {r.gpus} GPUs; a worker drives one GPU, "
            "so leave workers unset (one per GPU) or make it equal gpus"
        )
    if r.nodes > 1 and not r.gpus and r.workers is None:
        errors.append(
            f"{_resource_path(spec, i, 'nodes')}: {r.nodes} nodes with gpus 0 would train on CPUs across nodes; set "
            "resources.gpus, or set resources.workers to run CPU workers on purpose"
        )
    world = r.world_size
    if d.global_batch_size is not None and d.global_batch_size % (d.batch_size * world):
        errors.append(
            f"{_path(i, 'distill.globalBatchSize')}: {d.global_batch_size} does not divide into batchSize "
            f"{d.batch_size} x {world} workers ({r.workers_per_node} per node x {r.nodes} nodes); use a multiple "
            f"of {d.batch_size * world}, or change batchSize"
        )
    return errors


def default_input(spec: PipelineSpec, index: int) -> str:
    """`from` when omitted: the nearest earlier distill stage, else the student."""
    stage = spec.stages[index]
    if stage.from_:
        return stage.from_
    if stage.kind == "distill":
        return "student"
    for earlier in reversed(spec.stages[:index]):
        if earlier.kind in MODEL_PRODUCERS:
            return earlier.name
    return "student"


def _source_identity(ref: ModelRef) -> dict:
    return {"uri": ref.uri, "revision": ref.revision}


def stage_inputs(spec: PipelineSpec, index: int) -> dict[str, str]:
    stage = spec.stages[index]
    if stage.kind == TEACHER_LOGITS:
        return {"teacher": "teacher"}
    if stage.kind == "distill":
        assert stage.distill is not None
        if stage.distill.teacher_logits:  # the teacher's stored logits instead of the teacher
            return {"teacherLogits": stage.distill.teacher_logits, "student": default_input(spec, index)}
        return {"teacher": "teacher", "student": default_input(spec, index)}
    if stage.kind == "quantize":
        return {"model": default_input(spec, index)}
    assert stage.evaluate is not None
    return {name: name for name in stage.evaluate.of}


def _identity(stage: Stage, resources: Resources) -> dict:
    """The stage's fields that shape its output.

    Fields that only say how the stage runs are left out at their neutral values (see
    NOT_IN_DIGEST), so adding such a field never moves an existing artifact. With a
    globalBatchSize, batchSize and gradientAccumulationSteps only split it (a stage resumes its
    checkpoints on another worker count or micro-batch); without one the global batch grows with
    the workers, so then their count is in.
    """
    doc = stage.config.model_dump(mode="json", by_alias=True)
    for key, neutral in getattr(stage.config, "NOT_IN_DIGEST", {}).items():
        if doc.get(key) in neutral:
            doc.pop(key)
    for key in getattr(stage.config, "RUN_ONLY", ()):
        doc.pop(key)
    if stage.kind == "quantize":  # as resolved: an explicit `imatrix: false` keeps the digest made before it existed
        doc.pop("imatrix")
        if stage.config.uses_imatrix:
            doc["imatrix"] = True
    if stage.kind == "evaluate":  # gates added later, when unset, move no digest made before they existed
        for key in ("maxKLDivergence", "minTop1Agreement"):
            if doc["gates"].get(key) is None:
                doc["gates"].pop(key, None)
    if stage.kind == "distill":
        # Out of the config: unset, it moves no digest made before the field existed; set, the stage's
        # name says nothing of the logits, whose own input digest stands in `inputs`.
        doc.pop("teacherLogits")
        if stage.config.global_batch_size is not None:  # the micro-batch only splits the same global batch
            doc.pop("batchSize")
            doc.pop("gradientAccumulationSteps")
        elif resources.world_size > 1:
            doc["worldSize"] = resources.world_size
    return doc


def input_digest(stage: Stage, inputs: dict[str, str], digests: dict[str, object], spec: PipelineSpec) -> str:
    """Content address: the stage's own spec, its inputs' identities and the dataset."""
    doc = {
        "v": DIGEST_VERSION,
        "kind": stage.kind,
        "config": _identity(stage, effective_resources(spec, stage)),
        "inputs": {role: digests[src] for role, src in inputs.items()},
        "dataset": spec.dataset.model_dump(mode="json", by_alias=True),
    }
    return "sha256:" + hashlib.sha256(dumps_canonical(doc).encode()).hexdigest()


def run_digest(spec: PipelineSpec, plan: StagePlan, retry: str | None = None) -> str:
    """What shapes a stage's pod but not its output: effective resources, image, storage access,
    and the pipeline's retry token (annotation kondense.io/retry).

    The fixes that failure hints name (more GPUs or memory, a longer deadline, another image, a
    corrected Secret) change this digest and never the input digest: the operator re-runs a
    failed stage, or rebuilds a Job that has not started, under the same artifact address.
    """
    doc = {
        # Unset optional fields left out: a field added to Resources later moves no digest.
        "resources": plan.resources.model_dump(mode="json", by_alias=True, exclude_none=True),
        "image": spec.image,
        "storage": spec.storage.model_dump(mode="json", by_alias=True, exclude={"deletion_policy"}),
        "retry": retry,
    }
    return "sha256:" + hashlib.sha256(dumps_canonical(doc).encode()).hexdigest()


def effective_resources(spec: PipelineSpec, stage: Stage) -> Resources:
    """spec.resources with the fields the stage sets itself laid over it."""
    if stage.resources is None:
        return spec.resources
    own = stage.resources  # its fields as models (model_dump would put dicts into a model)
    return spec.resources.model_copy(update={name: getattr(own, name) for name in own.model_fields_set})


def resolve(spec: PipelineSpec, namespace: str, pipeline: str) -> list[StagePlan]:
    """The stages in order with inputs and content addresses. Raises InvalidSpec."""
    errors = semantic_errors(spec)
    if errors:
        raise InvalidSpec("; ".join(errors))
    digests: dict[str, object] = {
        "teacher": _source_identity(spec.teacher),
        "student": _source_identity(spec.student),
    }
    plans = []
    for i, stage in enumerate(spec.stages):
        inputs = stage_inputs(spec, i)
        digest = input_digest(stage, inputs, digests, spec)
        digests[stage.name] = digest
        optional: frozenset[str] = frozenset()
        if stage.evaluate and stage.evaluate.on_missing_variant == "skip":
            baseline = stage.evaluate.baseline or stage.evaluate.of[0]
            optional = frozenset(v for v in stage.evaluate.of if v != baseline and v not in SOURCES)
        plans.append(
            StagePlan(
                name=stage.name,
                kind=stage.kind,
                index=i,
                inputs=inputs,
                input_digest=digest,
                output=artifact_uri(spec.storage.uri, namespace, pipeline, stage.name, digest),
                resources=effective_resources(spec, stage),
                optional=optional,
            )
        )
    return plans


def unavailable(plans: list[StagePlan], failed: Collection[str]) -> set[str]:
    """The stages that failed and those that cannot run because a required input is unavailable."""
    gone: set[str] = set()
    for p in plans:  # DAG order
        if p.name in failed or any(u in gone and u not in p.optional for u in p.upstream):
            gone.add(p.name)
    return gone


def settle(plans: list[StagePlan], failed: Collection[str], storage_uri: str, namespace: str, pipeline: str) -> list[StagePlan]:
    """The plans with each stage that may run without some inputs told which ones it runs without:
    those that failed or cannot run. Their names go into its input digest (and so its artifact and
    Job): a report made without a variant is not the report with it, and when that variant's
    stage succeeds after a retry, the stage runs again under its full digest."""
    gone = unavailable(plans, failed)
    settled = []
    for p in plans:
        missing = tuple(u for u in p.upstream if u in p.optional and u in gone)
        if missing:
            doc = {"inputDigest": p.input_digest, "missing": sorted(missing)}
            digest = "sha256:" + hashlib.sha256(dumps_canonical(doc).encode()).hexdigest()
            p = replace(
                p, missing=missing, input_digest=digest,
                output=artifact_uri(storage_uri, namespace, pipeline, p.name, digest),
            )
        settled.append(p)
    return settled


def missing_reasons(plans: list[StagePlan], failures: Mapping[str, str]) -> dict[str, str]:
    """Why each unavailable stage has no artifact: `failures` maps a failed stage to its reason
    and message; a stage that could not run names the input that held it back."""
    gone = unavailable(plans, failures)
    why: dict[str, str] = {}
    for p in plans:
        if p.name in failures:
            why[p.name] = f"stage {p.name} failed: {failures[p.name]}"
        elif p.name in gone:
            u = next(u for u in p.upstream if u in gone and u not in p.optional)
            why[p.name] = f"stage {p.name} did not run: its input {why[u]}"
    return why


def stage_run(
    spec: PipelineSpec, plans: list[StagePlan], name: str, namespace: str, pipeline: str,
    reasons: Mapping[str, str] | None = None,
) -> StageRun:
    """The document a stage's process reads: inputs as URIs with the digests to expect, and the
    inputs it runs without (plan.missing) with `reasons[stage]`, what the caller knows of why."""
    by_name = {p.name: p for p in plans}
    plan = by_name[name]
    stage = spec.stages[plan.index]
    models: dict[str, InputRef] = {}
    missing = {src: (reasons or {}).get(src) or f"stage {src} did not succeed" for src in plan.missing}
    for role, src in plan.inputs.items():
        if src in missing:
            continue
        if src in SOURCES:
            ref: ModelRef = getattr(spec, src)
            models[role] = InputRef(uri=ref.uri, revision=ref.revision)
        else:
            up = by_name[src]
            models[role] = InputRef(uri=up.output, stage=up.name, input_digest=up.input_digest)
    return StageRun(
        pipeline=pipeline,
        namespace=namespace,
        stage=name,
        stage_kind=stage.kind,
        **{stage.kind: stage.config},
        missing=missing,
        models=models,
        dataset=spec.dataset,
        output=plan.output,
        input_digest=plan.input_digest,
        storage=spec.storage,
        resources=plan.resources,
    )


@dataclass
class Decision:
    """What to do next. `committed` maps stage -> True when its manifest (matching digest) exists."""

    done: list[str] = field(default_factory=list)
    start: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return not (self.start or self.running or self.waiting)


def decide(
    plans: list[StagePlan],
    committed: set[str],
    running: set[str] = frozenset(),  # type: ignore[assignment]
    failed: set[str] = frozenset(),  # type: ignore[assignment]
    limit: int | None = None,
) -> Decision:
    """Pure: which stages are done, which start now, which wait, which cannot run.

    `committed`, `running` and `failed` hold stage names whose facts are about the stage's
    CURRENT input digest; the caller matches digests (a Job label, a manifest) before.

    A stage's `optional` inputs that failed or are blocked do not block it: it starts once the
    others are done, if `settle` has told it which inputs it runs without (`missing`); until
    then it waits, so that it never runs under the digest of a report with every variant.
    """
    d = Decision()
    state: dict[str, str] = {}
    for p in plans:  # plans are in DAG order: inputs come first
        ups = {u: state[u] for u in p.upstream}
        gone = {u for u, s in ups.items() if s in ("failed", "blocked") and u in p.optional}
        if p.name in committed:
            s = "done"
        elif p.name in running:
            s = "running"
        elif p.name in failed:
            s = "failed"
        elif any(s in ("failed", "blocked") for u, s in ups.items() if u not in gone):
            s = "blocked"
        elif all(s == "done" for u, s in ups.items() if u not in gone):
            s = "start" if gone == set(p.missing) else "waiting"
        else:
            s = "waiting"
        state[p.name] = s
        getattr(d, s if s != "start" else "start").append(p.name)
    if limit is not None:
        free = max(0, limit - len(d.running))
        d.waiting = [n for n in d.start[free:]] + d.waiting
        d.start = d.start[:free]
    return d
