"""The planner: DAG resolution, content addresses, decisions. Pure, fast."""

from __future__ import annotations

import copy

import pytest

from kondense.api import DistillSpec, PipelineSpec
from kondense.errors import InvalidSpec
from kondense.plan import decide, missing_reasons, resolve, semantic_errors, settle, stage_run

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


def test_imatrix_is_in_the_digest_as_resolved():
    def gguf(**quantize) -> str:
        return digests(spec(stages__2__quantize={"method": "gguf", **quantize}))["gguf"]

    # q4_k_m quantizes with an importance matrix by default: not the file an explicit `false` makes.
    assert gguf(type="q4_k_m") == gguf(type="q4_k_m", imatrix=True) != gguf(type="q4_k_m", imatrix=False)
    # q4_0 takes none by default; q8_0 (the converter's) never does, so the field moves nothing there.
    assert gguf(type="q4_0") == gguf(type="q4_0", imatrix=False) != gguf(type="q4_0", imatrix=True)
    assert gguf(type="q8_0") == gguf(type="q8_0", imatrix=False) == digests(spec())["gguf"]


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
        ({"stages__2__resources": {"nodes": 2}}, "spec.stages[2].resources.nodes: 2, but only distill stages run several workers"),
        ({"resources": {"workers": 2, "gpus": 0}}, "spec.resources.workers: 2, but only distill stages"),
    ],
    ids=["ok", "global-batch-gpus", "global-batch-nodes", "workers-vs-gpus", "cpu-nodes",
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


# ---------------------------------------------------------------------------------------------
# Offline teacher logits: one teacher pass, addressed by what determines it
# ---------------------------------------------------------------------------------------------

OFFLINE = [
    {"name": "teacher-logits", "teacherLogits": {"topK": 64, "maxSeqLength": 256}},
    {"name": "small", "distill": {"method": "logits", "teacherLogits": "teacher-logits", "maxSeqLength": 256}},
    {"name": "smaller", "distill": {"method": "logits", "teacherLogits": "teacher-logits", "maxSeqLength": 256,
                                    "learningRate": 1e-4, "temperature": 4.0}},
    {"name": "nf4", "from": "small", "quantize": {"method": "bnb-nf4"}},
]


def offline(**changes) -> PipelineSpec:
    return spec(stages=copy.deepcopy(OFFLINE), **changes)


def test_distill_stages_read_one_teacher_pass_and_no_teacher():
    s = offline()
    plans = {p.name: p for p in resolve(s, "ns", "p")}
    assert plans["teacher-logits"].inputs == {"teacher": "teacher"}
    for student in ("small", "smaller"):
        assert plans[student].inputs == {"teacherLogits": "teacher-logits", "student": "student"}
        assert plans[student].upstream == ["teacher-logits"]
    run = stage_run(s, list(plans.values()), "small", "ns", "p")
    assert set(run.models) == {"teacherLogits", "student"}
    ref = run.models["teacherLogits"]
    assert ref.uri == plans["teacher-logits"].output and ref.input_digest == plans["teacher-logits"].input_digest
    first = decide(list(plans.values()), committed=set())
    assert first.start == ["teacher-logits"] and first.waiting == ["small", "smaller", "nf4"]
    assert decide(list(plans.values()), committed={"teacher-logits"}).start == ["small", "smaller"]


@pytest.mark.parametrize(
    "changes, moves",
    [
        ({"stages__1__distill__learningRate": 1e-3}, ["small", "nf4"]),
        ({"stages__2__distill__temperature": 1.0}, ["smaller"]),
        ({"stages__0__teacherLogits__batchSize": 32}, []),  # how the pass runs, not what it stores
        ({"stages__0__teacherLogits__topK": 128}, ["teacher-logits", "small", "smaller", "nf4"]),
        ({"stages__0__teacherLogits__precision": "bf16"}, ["teacher-logits", "small", "smaller", "nf4"]),
        ({"teacher": {"uri": "s3://models/other"}}, ["teacher-logits", "small", "smaller", "nf4"]),
        ({"dataset": {"uri": "s3://data/other.jsonl"}}, ["teacher-logits", "small", "smaller", "nf4"]),
        ({"student": {"uri": "s3://models/other-student"}}, ["small", "smaller", "nf4"]),
    ],
    ids=["student-lr", "student-temperature", "pass-batch", "top-k", "precision", "teacher", "dataset", "student"],
)
def test_the_teacher_pass_is_addressed_by_teacher_dataset_and_its_own_fields_only(changes, moves):
    before, after = digests(offline()), digests(offline(**changes))
    assert [n for n in before if before[n] != after[n]] == moves


def test_renaming_the_teacher_pass_keeps_the_students_content_address():
    renamed = copy.deepcopy(OFFLINE)
    renamed[0]["name"] = "logits"
    for stage in renamed[1:3]:
        stage["distill"]["teacherLogits"] = "logits"
    before, after = digests(offline()), digests(spec(stages=renamed))
    assert before["small"] == after["small"] and before["teacher-logits"] == after["logits"]


def test_an_online_distill_digest_is_what_it_was_before_teacher_logits_existed():
    # The field unset leaves the content address as it was: committed students stay reusable.
    from kondense.plan import DIGEST_VERSION
    from kondense.store import dumps_canonical
    import hashlib

    s = spec()
    stage = s.stages[0]
    doc = stage.distill.model_dump(mode="json", by_alias=True)
    for key in ("teacherLogits", "strategy", "teacherLoad", "globalBatchSize"):
        doc.pop(key)
    expected = {
        "v": DIGEST_VERSION, "kind": "distill", "config": doc,
        "inputs": {"teacher": {"uri": "s3://models/teacher", "revision": None},
                   "student": {"uri": "s3://models/student", "revision": None}},
        "dataset": s.dataset.model_dump(mode="json", by_alias=True),
    }
    assert digests(s)["distill"] == "sha256:" + hashlib.sha256(dumps_canonical(expected).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# evaluate.onMissingVariant: skip runs evaluate on the variants that exist
# --------------------------------------------------------------------------------------------


def skipping(policy: str = "skip", baseline: str | None = None) -> list:
    evaluate = {"of": ["teacher", "distill", "nf4", "gguf"], "onMissingVariant": policy}
    if baseline:
        evaluate["baseline"] = baseline
    return resolve(spec(stages__3__evaluate=evaluate), "ns", "p")


def test_a_failed_variant_blocks_evaluate_by_default():
    plans = settle(skipping("fail"), {"nf4"}, "s3://bucket/prefix", "ns", "p")
    d = decide(plans, committed={"distill", "gguf"}, failed={"nf4"})
    assert d.blocked == ["eval"] and d.start == [] and d.finished


def test_with_skip_evaluate_starts_on_the_variants_that_exist_once_settled():
    plans = skipping()
    eval_plan = plans[3]
    assert eval_plan.optional == {"distill", "nf4", "gguf"}  # all but the baseline (teacher, a source anyway)
    # Unsettled (the caller has not told the plan which inputs failed): it waits rather than run
    # under the digest of the report with every variant.
    d = decide(plans, committed={"distill", "gguf"}, failed={"nf4"})
    assert d.start == [] and d.waiting == ["eval"] and not d.blocked
    settled = settle(plans, {"nf4"}, "s3://bucket/prefix", "ns", "p")
    d = decide(settled, committed={"distill", "gguf"}, failed={"nf4"})
    assert d.start == ["eval"] and not d.blocked
    # Its own content address: the report without nf4 is not the report with it.
    ev = settled[3]
    assert ev.missing == ("nf4",) and ev.input_digest != eval_plan.input_digest
    assert ev.output.startswith("s3://bucket/prefix/ns/p/eval-") and ev.output.endswith(ev.input_digest[7:19])
    assert settled[:3] == plans[:3]
    # Still waits for the variants that may yet come.
    assert decide(settled, committed={"distill"}, running={"gguf"}, failed={"nf4"}).waiting == ["eval"]


def test_with_skip_a_variant_blocked_by_a_failed_stage_is_missing_too():
    plans = settle(skipping(), {"distill"}, "s3://bucket/prefix", "ns", "p")
    assert plans[3].missing == ("distill", "nf4", "gguf")
    d = decide(plans, committed=set(), failed={"distill"})
    assert d.blocked == ["nf4", "gguf"] and d.start == ["eval"]
    why = missing_reasons(plans, {"distill": "OOMKilled: the pod ran out of memory"})
    assert why["distill"] == "stage distill failed: OOMKilled: the pod ran out of memory"
    assert why["nf4"] == "stage nf4 did not run: its input stage distill failed: OOMKilled: the pod ran out of memory"
    run = stage_run(spec(), plans, "eval", "ns", "p", why)
    assert set(run.models) == {"teacher"}  # the missing ones have no input to fetch
    assert run.missing == {name: why[name] for name in ("distill", "nf4", "gguf")}


def test_with_skip_a_missing_baseline_still_blocks_evaluate():
    plans = settle(skipping(baseline="distill"), {"distill"}, "s3://bucket/prefix", "ns", "p")
    assert plans[3].missing == ("nf4", "gguf")
    d = decide(plans, committed=set(), failed={"distill"})
    assert d.blocked == ["nf4", "gguf", "eval"] and d.start == []


def test_a_settled_stage_runs_again_under_its_full_digest_once_the_variant_succeeds():
    partial = settle(skipping(), {"nf4"}, "s3://bucket/prefix", "ns", "p")
    full = settle(skipping(), set(), "s3://bucket/prefix", "ns", "p")
    assert full == skipping()
    # The partial report is committed under the partial digest only; after a retry of nf4 the plan
    # is the full one again, whose artifact does not exist yet: evaluate starts.
    d = decide(full, committed={"distill", "nf4", "gguf"})
    assert d.start == ["eval"] and partial[3].input_digest != full[3].input_digest


def test_on_missing_variant_and_unset_divergence_gates_do_not_move_the_evaluate_digest():
    before = digests(spec())
    assert digests(spec(stages__3__evaluate={"of": ["teacher", "distill", "nf4", "gguf"], "onMissingVariant": "skip"})) == before
    gated = digests(spec(stages__3__evaluate={"of": ["teacher", "distill", "nf4", "gguf"], "gates": {"maxKLDivergence": 0.1}}))
    assert [n for n in before if before[n] != gated[n]] == ["eval"]


# ---------------------------------------------------------------------------------------------
# `kondense plan` of quantize stages: a GPU row and a host-memory row
# ---------------------------------------------------------------------------------------------


def plan_main(tmp_path, capsys, doc: dict, teacher: dict, student: dict) -> tuple[int, str, str]:
    """`kondense plan` in-process on `doc`, the models' config.json given on the command line (no store)."""
    import json

    import yaml

    from kondense.cli import main

    paths = {}
    for role, cfg in (("teacher", teacher), ("student", student)):
        paths[role] = tmp_path / f"{role}.json"
        paths[role].write_text(json.dumps(cfg))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(doc))
    code = main(["plan", str(pipeline), "--config", f"teacher={paths['teacher']}", "--config", f"student={paths['student']}"])
    out = capsys.readouterr()
    return code, out.out, out.err


def flagship_doc() -> dict:
    from pathlib import Path

    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[2] / "crds/examples/llama-70b-to-8b.yaml").read_text())


def catalogue(name: str, **changes) -> dict:
    from kondense.fit import catalogue as table

    return {**table()[name], **changes}


def rows(out: str, stage: str) -> tuple[str, str]:
    """The stage's row and the row after it."""
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(stage + " "))
    return lines[i], lines[i + 1]


def test_plan_shows_the_host_memory_of_quantize_stages(tmp_path, capsys):
    code, out, err = plan_main(tmp_path, capsys, flagship_doc(), catalogue("llama-3.1-70b"), catalogue("llama-3.1-8b"))
    assert code == 0, out + err
    assert "hessians" in next(line for line in out.splitlines() if line.startswith("stage "))  # GPTQ's column
    gptq, host = rows(out, "gptq")
    assert "sequential, layer by layer" in gptq and gptq.endswith("fits")
    assert host.split()[:3] == ["host", "host", "memory"] and host.split()[-2:] == ["200.0", "fits"]  # spec.resources.memory 200Gi
    # the host holds the whole bf16 8B student (~15 GiB); the GPU one subgraph and GPTQ's Hessians
    host_total, gpu_total = float(host.split()[-3]), float(gptq.split()[-3])
    assert 15 < host_total < 25 and gpu_total < host_total / 2
    _, after_gguf = rows(out, "gguf")
    assert not after_gguf.split()[:1] == ["host"]  # gguf is host memory only: one row
    assert "host: the same stage's host memory" in out


def test_plan_exits_14_when_the_host_cannot_hold_the_model_naming_resources_memory(tmp_path, capsys):
    doc = flagship_doc()
    doc["spec"]["stages"] = [
        {"name": "gptq-70b", "from": "teacher", "quantize": {"method": "gptq"}, "resources": {"gpus": 1, "memory": "64Gi"}}
    ]
    teacher = catalogue("llama-3.1-70b", torch_dtype="bfloat16")
    code, out, err = plan_main(tmp_path, capsys, doc, teacher, catalogue("llama-3.1-8b"))
    assert code == 14, out + err
    gptq, host = rows(out, "gptq-70b")
    assert gptq.split()[-2:] == ["80.0", "fits"]  # one layer fits the GPU...
    assert host.split()[-4:] == ["64.0", "DOES", "NOT", "FIT"]  # ...the whole model does not fit 64Gi
    assert "gptq-70b needs" in out and "GiB in host memory" in out and "(resources.memory 64Gi)" in out
    fix = next(line for line in out.splitlines() if line.strip().startswith("- resources.memory: "))
    assert 131 < int(fix.split("resources.memory: ")[1].split("Gi")[0]) < 160
    assert "InsufficientResources: gptq-70b" in err

    doc["spec"]["stages"][0]["resources"]["memory"] = fix.split("resources.memory: ")[1].split()[0]
    code, out, err = plan_main(tmp_path, capsys, doc, teacher, catalogue("llama-3.1-8b"))
    assert code == 0, out + err  # the fix the plan named is enough
