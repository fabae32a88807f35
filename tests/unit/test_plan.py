"""The planner: DAG resolution, content addresses, decisions. Pure, fast."""

from __future__ import annotations

import copy

import pytest

from kondense.api import DistillSpec, PipelineSpec
from kondense.errors import InvalidSpec
from kondense.plan import decide, resolve, semantic_errors, stage_run

BASE = {
    "teacher": {"uri": "s3://models/teacher"},
    "student": {"uri": "s3://models/student"},
    "dataset": {"uri": "s3://data/data.jsonl"},
    "storage": {"uri": "s3://bucket/prefix"},
    "stages": [
        {"name": "distill", "distill": {"method": "logits"}},
        {"name": "nf4", "quantize": {"method": "bnb-nf4"}},
        {"name": "gguf", "quantize": {"method": "gguf", "type": "q8_0"}},
        {"name": "eval", "evaluate": {"of": ["teacher", "distill", "nf4", "gguf"]}},
    ],
}


def spec(**changes) -> PipelineSpec:
    doc = copy.deepcopy(BASE)
    for path, value in changes.items():
        target = doc
        keys = path.split("__")
        for k in keys[:-1]:
            target = target[int(k)] if k.isdigit() else target[k]
        target[keys[-1]] = value
    return PipelineSpec.model_validate(doc)


def test_inputs_default_to_nearest_distill_stage():
    plans = {p.name: p for p in resolve(spec(), "ns", "p")}
    assert plans["distill"].inputs == {"teacher": "teacher", "student": "student"}
    assert plans["nf4"].inputs == {"model": "distill"}
    assert plans["gguf"].inputs == {"model": "distill"}
    assert plans["eval"].inputs == {v: v for v in ["teacher", "distill", "nf4", "gguf"]}


def test_output_is_content_addressed_under_namespace_and_pipeline():
    p = resolve(spec(), "ml", "run1")[0]
    assert p.output.startswith("s3://bucket/prefix/ml/run1/distill-")
    assert p.input_digest.startswith("sha256:") and p.output.endswith(p.input_digest[7:19])


def digests(s: PipelineSpec) -> dict[str, str]:
    return {p.name: p.input_digest for p in resolve(s, "ns", "p")}


def test_editing_one_quantize_stage_changes_it_and_evaluate_only():
    before = digests(spec())
    after = digests(spec(stages__2__quantize={"method": "gguf", "type": "q4_k_m"}))
    assert [n for n in before if before[n] != after[n]] == ["gguf", "eval"]


def test_editing_distill_changes_everything_downstream():
    before = digests(spec())
    after = digests(spec(stages__0__distill={"method": "logits", "temperature": 4.0}))
    assert all(before[n] != after[n] for n in before)


def test_changing_the_teacher_uri_changes_distill_digest():
    assert digests(spec())["distill"] != digests(spec(teacher={"uri": "s3://models/other"}))["distill"]


def test_resources_do_not_change_digests_unless_they_change_the_global_batch():
    assert digests(spec()) == digests(spec(resources={"gpus": 1, "memory": "64Gi", "queueName": "q"}))
    # Without globalBatchSize, 4 workers train on 4 times the batch: another student.
    assert digests(spec())["distill"] != digests(spec(resources={"gpus": 4}))["distill"]
    # With a globalBatchSize they do not: test_worker_count_and_micro_batch_do_not_move_the_artifact_...


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"name": "q", "from": "nope", "quantize": {"method": "gguf"}}], "spec.stages[0].from: 'nope' names no stage"),
        (
            [{"name": "q", "from": "d", "quantize": {"method": "gguf"}}, {"name": "d", "distill": {}}],
            "spec.stages[0].from: 'd' must be an earlier stage",
        ),
        (
            [{"name": "a", "quantize": {"method": "gguf"}}, {"name": "b", "from": "a", "quantize": {"method": "bnb-nf4"}}],
            "spec.stages[1].from: 'a' is a quantize stage",
        ),
        ([{"name": "e", "evaluate": {"of": ["ghost"]}}], "spec.stages[0].evaluate.of[0]: 'ghost' names no stage"),
        ([{"name": "d", "distill": {}}, {"name": "d", "distill": {}}], "duplicate stage name 'd'"),
    ],
    ids=["unknown-from", "forward-ref-cycle", "quantize-of-quantized", "unknown-variant", "duplicate"],
)
def test_semantic_errors_name_the_field(stages, message):
    s = spec(stages=stages)
    errors = semantic_errors(s)
    assert any(message in e for e in errors), errors
    with pytest.raises(InvalidSpec, match="spec.stages"):
        resolve(s, "ns", "p")


def test_decide_runs_independent_stages_in_parallel_after_their_input():
    plans = resolve(spec(), "ns", "p")
    first = decide(plans, committed=set())
    assert first.start == ["distill"] and first.waiting == ["nf4", "gguf", "eval"]
    second = decide(plans, committed={"distill"})
    assert second.start == ["nf4", "gguf"] and second.waiting == ["eval"]
    limited = decide(plans, committed={"distill"}, limit=1)
    assert limited.start == ["nf4"] and "gguf" in limited.waiting


def test_decide_blocks_downstream_of_a_failure_but_not_siblings():
    plans = resolve(spec(), "ns", "p")
    d = decide(plans, committed={"distill"}, failed={"nf4"}, running={"gguf"})
    assert d.failed == ["nf4"] and d.running == ["gguf"] and d.blocked == ["eval"] and d.start == []
    assert not d.finished


def test_decide_finished_when_all_committed():
    plans = resolve(spec(), "ns", "p")
    d = decide(plans, committed={p.name for p in plans})
    assert d.finished and d.done == [p.name for p in plans]


def test_stage_run_points_at_upstream_artifacts_with_expected_digest():
    s = spec()
    plans = resolve(s, "ns", "p")
    run = stage_run(s, plans, "nf4", "ns", "p")
    assert run.models["model"].uri == plans[0].output
    assert run.models["model"].input_digest == plans[0].input_digest
    assert run.quantize.method == "bnb-nf4" and run.output == plans[1].output
    teacher = stage_run(s, plans, "distill", "ns", "p").models["teacher"]
    assert teacher.uri == "s3://models/teacher" and teacher.stage is None


# ---------------------------------------------------------------------------------------------
# Workers, nodes and the global batch, checked on a stage's effective resources
# ---------------------------------------------------------------------------------------------

GLOBAL = {"method": "logits", "batchSize": 2, "globalBatchSize": 16}


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"stages__0__resources": {"gpus": 4}}, None),
        ({"stages__0__resources": {"gpus": 3}},
         "spec.stages[0].distill.globalBatchSize: 16 does not divide into batchSize 2 x 3 workers"),
        ({"stages__0__resources": {"gpus": 4, "nodes": 3}},
         "does not divide into batchSize 2 x 12 workers (4 per node x 3 nodes)"),
        ({"stages__0__resources": {"gpus": 4, "workers": 2}}, "spec.stages[0].resources.workers: 2 workers on 4 GPUs"),
        ({"stages__0__resources": {"gpus": 0, "nodes": 2}}, "spec.stages[0].resources.nodes: 2 nodes with gpus 0"),
        ({"stages__0__resources": {"gpus": 0, "workers": 2}, "stages__0__distill": {**GLOBAL, "strategy": "fsdp"}},
         "spec.stages[0].distill.strategy: fsdp shards"),
        ({"stages__2__resources": {"nodes": 2}}, "spec.stages[2].resources.nodes: 2, but only distill stages run several workers"),
        ({"resources": {"workers": 2, "gpus": 0}}, "spec.resources.workers: 2, but only distill stages"),
    ],
    ids=["ok", "global-batch-gpus", "global-batch-nodes", "workers-vs-gpus", "cpu-nodes", "fsdp-on-cpu",
         "quantize-nodes", "inherited-workers"],
)
def test_parallel_fields_are_checked_with_their_path(changes, expected):
    errors = semantic_errors(spec(**{"stages__0__distill": GLOBAL, **changes}))
    if expected is None:
        assert errors == []
    else:
        assert any(expected in e for e in errors), errors


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("globalBatchSize", 5, "globalBatchSize must be a multiple of batchSize"),
        ("teacherLoad", "sharded", "teacherLoad sharded is only for method logits"),
        ("strategy", "fsdp", "strategy fsdp is not for method gkd"),
    ],
)
def test_fields_alone_are_refused_by_the_model(field, value, message):
    with pytest.raises(ValueError, match=message):
        DistillSpec.model_validate({"method": "gkd" if field != "globalBatchSize" else "logits", "batchSize": 2, field: value})


def test_worker_count_and_micro_batch_do_not_move_the_artifact_with_a_global_batch():
    a = digests(spec(stages__0__distill=GLOBAL, stages__0__resources={"gpus": 4}))
    b = digests(spec(stages__0__distill={**GLOBAL, "batchSize": 1, "strategy": "fsdp"}, stages__0__resources={"gpus": 8}))
    assert a == b
    c = digests(spec(stages__0__distill={**GLOBAL, "globalBatchSize": 32}, stages__0__resources={"gpus": 4}))
    assert c["distill"] != a["distill"]


def test_a_stage_replaces_the_pod_fields_it_sets_keeps_the_others_and_they_stay_typed():
    """Lists and objects too are replaced whole, never merged; the effective resources hold
    models, as the pipeline's own do (manifests read them as models)."""
    hf = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    s = spec(
        resources={"env": [hf], "envFrom": [{"configMapRef": {"name": "proxy"}}], "scratchSize": "500Gi",
                   "affinity": {"nodeAffinity": {"x": 1}}, "gpuResource": "nvidia.com/mig-3g.40gb"},
        stages__1__resources={"env": [{"name": "A", "value": "1"}], "affinity": {"podAffinity": {}},
                              "tolerations": [{"key": "k", "operator": "Exists"}], "scratchSize": "50Gi"},
    )
    plans = {p.name: p.resources for p in resolve(s, "ns", "p")}
    nf4, distill = plans["nf4"], plans["distill"]
    assert [v.dump() for v in nf4.env] == [{"name": "A", "value": "1"}]
    assert nf4.tolerations[0].dump() == {"key": "k", "operator": "Exists"}
    assert nf4.affinity.dump() == {"podAffinity": {}} and nf4.scratch_size == "50Gi"
    assert nf4.env_from == distill.env_from and nf4.gpu_resource == "nvidia.com/mig-3g.40gb"
    assert [v.dump() for v in distill.env] == [hf] and distill.scratch_size == "500Gi"
    assert digests(s) == digests(spec()), "how a stage's pod runs is not in its content address"
