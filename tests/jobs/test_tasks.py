"""Task accuracy in the evaluate stage: lm-evaluation-harness on every variant, recovery, gates.

The two tasks are built on the spot from the test corpus (kondense_jobs.tasks.build_demo_tasks):
a multiple-choice next word and an exact-match phrase completion. The stage's scores are checked
against lm-eval run directly on the same model; GGUF variants run through llama.cpp (LlamaCppLM).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from kondense.api import EvaluateSpec, Gates, InputRef, TaskSpec
from kondense.errors import InvalidInput, InvalidSpec
from kondense.store import FileStore

SEQ = 64
MAX_TOKENS = 1024
MC, PHRASE = "docstring-next-word", "docstring-phrase"
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("kondense_jobs.gguf") is not None
pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory, corpus_texts) -> Path:
    from kondense_jobs.tasks import build_demo_tasks

    folder = tmp_path_factory.mktemp("tasks")
    assert build_demo_tasks(corpus_texts, folder, examples=60, fewshot_examples=8) == {
        MC: "multiple_choice", PHRASE: "generate_until"
    }
    return folder


def task_specs(folder: Path, **gates) -> list[TaskSpec]:
    return [
        TaskSpec(name=MC, uri=f"file://{folder}", num_fewshot=1, limit=20, **gates),
        TaskSpec(name=PHRASE, uri=f"file://{folder}", num_fewshot=0, limit=16),
    ]


@pytest.fixture(scope="module")
def gguf_q8(teacher_quantized) -> InputRef:
    return teacher_quantized("q8_0")


@pytest.fixture(scope="module")
def nf4(teacher_quantized) -> InputRef:
    return teacher_quantized("nf4")


def direct_lm_eval(model_dir: Path, folder: Path, tmp: Path) -> dict[str, tuple[float, float]]:
    """lm-eval's simple_evaluate on the model, the same tasks, few-shot counts and limits: {task: (score, stderr)}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    copy = tmp / "direct-tasks"
    copy.mkdir()
    for path in folder.glob("*.yaml"):  # data_files made absolute: lm-eval reads them relative to the working dir
        cfg = yaml.safe_load(path.read_text())
        cfg["dataset_kwargs"]["data_files"] = {k: str(folder / v) for k, v in cfg["dataset_kwargs"]["data_files"].items()}
        (copy / path.name).write_text(yaml.safe_dump(cfg))
    manager = TaskManager(include_path=str(copy), include_defaults=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_dir), batch_size=8,
              max_length=model.config.max_position_embeddings)
    out = {}
    for spec in task_specs(folder):
        res = lm_eval.simple_evaluate(model=lm, tasks=[spec.name], num_fewshot=spec.num_fewshot, limit=spec.limit,
                                      task_manager=manager, bootstrap_iters=1000, log_samples=False)
        row = res["results"][spec.name]
        key = next(k for k in row if "," in k and "_stderr" not in k)
        metric, _, filt = key.partition(",")
        out[spec.name] = (float(row[key]), float(row[f"{metric}_stderr,{filt}"]))
    return out


@pytest.mark.slow
def test_task_scores_recovery_and_the_recovery_gate_through_the_stage(
    tmp_path, tmp_path_factory, make_run, run_stage, tiny_teacher, tiny_student, tiny_dataset, task_folder, gguf_q8, nf4
):
    """teacher (baseline), a random student, NF4 and GGUF q8_0 of the teacher on both tasks; the
    recovery gate on the student fails, naming the variant, the task and both numbers."""
    models = {"teacher": tiny_teacher, "student": tiny_student, "nf4": nf4, "gguf": gguf_q8}
    spec = EvaluateSpec(of=list(models), seq_length=SEQ, max_eval_tokens=MAX_TOKENS, generate_tokens=4,
                        tasks=task_specs(task_folder), gates=Gates(min_recovery=0.9, applies_to=["student"]))
    run, path = make_run(tmp_path, "evaluate", spec, models, dataset=tiny_dataset, stage="eval")
    code, summary, output = run_stage("evaluate", path, tmp_path)
    assert code == 13, output[-3000:]
    assert summary.reason == "QualityGateFailed"
    out = FileStore.path(run.output)
    doc = json.loads((out / "report.json").read_text())
    scores = {v["variant"]: {t["task"]: t for t in v["tasks"]} for v in doc["variants"]}

    # The HF baseline's scores are lm-eval's own on the same model, tasks, few-shot counts and limits.
    direct = direct_lm_eval(tiny_teacher, task_folder, tmp_path)
    for task, (score, stderr) in direct.items():
        assert scores["teacher"][task]["score"] == pytest.approx(score, abs=1e-12)
        assert scores["teacher"][task]["stderr"] == pytest.approx(stderr, abs=1e-12)
    assert [t["samples"] for t in doc["setup"]["tasks"]] == [20, 16]
    assert [t["metric"] for t in doc["setup"]["tasks"]] == ["acc,none", "exact_match,first-word"]
    # The trained teacher is well above chance (1 in 4) on the next word; the random student is not.
    assert scores["teacher"][MC]["score"] >= 0.5 and scores["student"][MC]["score"] < scores["teacher"][MC]["score"]
    # Quantized copies of the teacher score within a few examples of it, through transformers and llama.cpp.
    for variant in ("nf4", "gguf"):
        for task, n in ((MC, 20), (PHRASE, 16)):
            assert abs(scores[variant][task]["score"] - scores["teacher"][task]["score"]) <= 2 / n + 1e-9, (variant, task)
            assert scores[variant][task]["note"] is None

    # Recovery: the score over the baseline's, per task; the mean over the tasks.
    for v in doc["variants"]:
        per_task = [scores[v["variant"]][t]["score"] / scores["teacher"][t]["score"] for t in (MC, PHRASE)]
        assert [scores[v["variant"]][t]["recovery"] for t in (MC, PHRASE)] == pytest.approx(per_task, abs=1e-12)
        assert v["recovery"] == pytest.approx(sum(per_task) / 2, abs=1e-12)
    assert doc["variants"][0]["recovery"] == 1.0

    # The gate: per task and on the mean, each failure naming the variant, the task and both numbers.
    s, t = scores["student"], scores["teacher"]
    expected = [
        f"student: {task} {s[task]['score']:.4f} against teacher's {t[task]['score']:.4f}, recovery "
        f"{s[task]['recovery']:.4f} is below gate minRecovery 0.9"
        for task in (MC, PHRASE) if s[task]["recovery"] < 0.9
    ]
    mean = doc["variants"][1]["recovery"]
    expected.append(f"student: mean recovery over 2 tasks {mean:.4f} is below gate minRecovery 0.9")
    assert summary.message == "; ".join(expected)
    assert [(c["variant"], c["task"]) for c in doc["gate"]["checks"]] == [("student", MC), ("student", PHRASE), ("student", "mean")]

    # Every form of the report carries them: status rows, report.md, metrics.
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {r["variant"]: r for r in manifest["extra"]["report"]["table"]}
    g = scores["gguf"][MC]
    expected_row = {"task": MC, "score": g["score"], "stderr": g["stderr"], "recovery": g["recovery"]}
    assert rows["gguf"]["tasks"][0] == {k: v for k, v in expected_row.items() if v is not None}
    assert rows["student"]["recovery"] == pytest.approx(mean)
    md = (out / "report.md").read_text()
    assert "## Tasks" in md and f"| variant | {MC} | {PHRASE} | recovery |" in md
    assert f"| teacher (baseline) | {t[MC]['score']:.4f} ± {t[MC]['stderr']:.4f} |" in md
    assert f"FAIL student: {MC}" in md
    assert manifest["metrics"][f"teacher.{MC}"] == round(t[MC]["score"], 6)
    assert manifest["metrics"]["student.recovery"] == round(mean, 6)

    # report.json's task keys are an interface (kondense_jobs/report.py): pinned.
    keys = list(doc["variants"][0])
    assert keys[keys.index("perplexity_increase") + 1:][:2] == ["tasks", "recovery"]  # appended, in this order
    assert list(doc["variants"][0]["tasks"][0]) == ["task", "metric", "score", "stderr", "samples", "note", "recovery", "recovery_note"]
    assert list(doc["setup"]["tasks"][0]) == [
        "name", "source", "uri", "output_type", "metric", "num_fewshot", "limit", "examples", "samples"
    ]
    assert doc["setup"]["lm_eval"] == "0.4.13"
    assert list(doc["gate"]["checks"][0]) == ["variant", "gate", "value", "limit", "passed", "text", "task"]


def test_a_variant_that_cannot_run_a_task_is_n_a_with_the_reason_and_fails_its_gate():
    from kondense_jobs.evaluate import check_gates
    from kondense_jobs.report import Measurement, recoveries
    from kondense_jobs.tasks import TaskScore

    def m(name, mc, phrase):
        return Measurement(name, "hf", 1, 1, 1, 100.0, 10.0, tasks=[mc, phrase])

    base = m("base", TaskScore(MC, "acc,none", 0.8, 0.05, 20), TaskScore(PHRASE, "exact_match,first-word", 0.0, 0.0, 16))
    why = f"{MC} n/a: LlamaCppLM decodes greedily; the task asks for sampling"
    q = m("q", TaskScore(MC, "acc,none", note=why), TaskScore(PHRASE, "exact_match,first-word", 0.0, 0.0, 16))
    per_task, overall = recoveries(q, base)
    assert per_task == {MC: (None, why), PHRASE: (None, f"{PHRASE}: the baseline base scores 0, so a ratio to it is undefined")}
    assert overall is None
    specs = [TaskSpec(name=MC, min_recovery=0.95), TaskSpec(name=PHRASE)]
    result = check_gates(Gates(), "base", [base, q], None, specs)
    assert not result.passed and result.message == f"q: {MC} recovery n/a ({why}); gate minRecovery 0.95"
    result = check_gates(Gates(min_recovery=0.5), "base", [base, q], None, specs)
    assert [c.text for c in result.checks] == [
        f"q: {MC} recovery n/a ({why}); gate minRecovery 0.95",
        f"q: {PHRASE} recovery n/a ({PHRASE}: the baseline base scores 0, so a ratio to it is undefined); gate minRecovery 0.5",
        f"q: mean recovery over the tasks n/a ({why}; {PHRASE}: the baseline base scores 0, so a ratio to it is undefined); "
        "gate minRecovery 0.5",
    ]
    row = q.row(base)
    assert row.recovery is None and row.tasks[0].score is None and row.tasks[0].note == why
    ok = m("ok", TaskScore(MC, "acc,none", 0.76, 0.05, 20), TaskScore(PHRASE, "exact_match,first-word", 0.1, 0.05, 16))
    result = check_gates(Gates(), "base", [base, ok], None, [TaskSpec(name=MC, min_recovery=0.9)])
    assert result.passed and result.message == (
        f"all quality gates passed: ok: {MC} 0.7600 against base's 0.8000, recovery 0.9500 meets gate minRecovery 0.9"
    )


@pytest.mark.slow
def test_a_gguf_variant_that_cannot_run_a_task_says_why(tmp_path, task_folder, gguf_q8, tiny_teacher, make_run):
    """LlamaCppLM decodes greedily: a task that samples is n/a for the GGUF variant, with the reason."""
    from transformers import AutoTokenizer

    from kondense_jobs import tasks

    sampled = tmp_path / "sampled"
    shutil.copytree(task_folder, sampled)
    cfg = (sampled / f"{PHRASE}.yaml").read_text().replace("do_sample: false", "do_sample: true\n  temperature: 0.8")
    (sampled / f"{PHRASE}.yaml").write_text(cfg)
    ctx = context(tmp_path, make_run)
    prepared = tasks.prepare(ctx, [TaskSpec(name=PHRASE, uri=f"file://{sampled}", limit=2)], tmp_path / "work")
    lm = tasks.llama_cpp_lm(next(FileStore.path(gguf_q8.uri).glob("*.gguf")), AutoTokenizer.from_pretrained(tiny_teacher))
    try:
        got = tasks.run_tasks(lm, prepared, "gguf")[PHRASE]
    finally:
        lm.close()
    assert got.score is None and got.note == f"{PHRASE} n/a: LlamaCppLM decodes greedily; the task asks for sampling (do_sample or temperature > 0)"


# --------------------------------------------------------------------------------------------
# Where tasks come from, and what is refused (before any model loads)
# --------------------------------------------------------------------------------------------


def context(tmp_path, make_run):
    from kondense_jobs.runtime import Context

    run, _ = make_run(tmp_path, "evaluate", EvaluateSpec(of=["teacher"]), {"teacher": tmp_path}, stage="eval")
    return Context(run, tmp_path / "work", tmp_path / "cache")


def test_task_definition_problems_are_refused_naming_the_file_or_field(tmp_path, task_folder, make_run):
    from kondense_jobs import tasks

    ctx = context(tmp_path, make_run)
    broken = tmp_path / "broken"
    shutil.copytree(task_folder, broken)
    (broken / f"{MC}.test.jsonl").unlink()
    with pytest.raises(InvalidInput) as missing:
        tasks.prepare(ctx, [TaskSpec(name=MC, uri=f"file://{broken}")], tmp_path / "w1")
    assert str(missing.value).startswith(
        f"evaluate.tasks[0] ({MC}): {MC}.yaml names the data file {MC}.test.jsonl, which is not in file://{broken}"
    )
    with pytest.raises(InvalidSpec) as shots:
        tasks.prepare(ctx, [TaskSpec(name=PHRASE, uri=f"file://{task_folder}"),
                            TaskSpec(name=MC, uri=f"file://{task_folder}", num_fewshot=9)], tmp_path / "w2")
    assert str(shots.value) == (
        f"evaluate.tasks[1].numFewshot 9 is more than the 8 examples task {MC} has to draw few-shot examples from. "
        "To resolve, lower numFewshot to at most 8."
    )
    with pytest.raises(InvalidInput) as nowhere:
        tasks.prepare(ctx, [TaskSpec(name=MC, uri=f"file://{tmp_path}/absent")], tmp_path / "w3")
    assert str(nowhere.value) == f"evaluate.tasks[0] ({MC}): file://{tmp_path}/absent does not exist"


@pytest.mark.slow
def test_unknown_tasks_and_registry_tasks_without_their_data(tmp_path, task_folder, make_run):
    """lm-eval's registry (indexed once, ~20 s): a name in neither place lists where tasks are looked
    up; a registry task whose data is not in the (offline) datasets cache says what is missing."""
    from kondense_jobs import tasks

    ctx = context(tmp_path, make_run)
    with pytest.raises(InvalidSpec) as unknown:
        tasks.prepare(ctx, [TaskSpec(name="docstring-typo", uri=f"file://{task_folder}")], tmp_path / "w1")
    assert str(unknown.value) == (
        f"evaluate.tasks[0].name 'docstring-typo': no YAML in file://{task_folder} defines `task: docstring-typo` "
        f"(it holds ['{MC}.yaml', '{PHRASE}.yaml']), and lm-eval's registry has no such task; "
        + tasks.where_tasks_come_from(0)
    )
    assert "evaluate.tasks[0].uri" in str(unknown.value) and "lm-eval 0.4.13's registry" in str(unknown.value)
    with pytest.raises(InvalidSpec) as no_uri:
        tasks.prepare(ctx, [TaskSpec(name="arc_eesy")], tmp_path / "w2")
    assert str(no_uri.value).startswith("evaluate.tasks[0].name 'arc_eesy' is not a task; tasks are looked up (1) in")
    empty_cache = tmp_path / "datasets-cache"
    empty_cache.mkdir()
    for spec, where in ((TaskSpec(name="arc_easy"), "the pod's datasets cache (HF_DATASETS_CACHE; read offline)"),
                        (TaskSpec(name="arc_easy", uri=f"file://{empty_cache}"), f"the datasets cache file://{empty_cache}")):
        with pytest.raises(InvalidInput) as no_data:
            tasks.prepare(ctx, [spec], tmp_path / "w3")
        message = str(no_data.value)
        assert message.startswith(f"evaluate.tasks[0] (arc_easy): its data cannot be loaded from {where}: "), message
        assert "To resolve, copy the task's data into a datasets cache" in message


@pytest.mark.slow
def test_the_stage_exits_11_on_missing_task_data_before_loading_a_model(tmp_path, make_run, run_stage, tiny_teacher, tiny_dataset, task_folder):
    broken = tmp_path / "broken"
    shutil.copytree(task_folder, broken)
    (broken / f"{PHRASE}.train.jsonl").unlink()
    spec = EvaluateSpec(of=["teacher"], seq_length=SEQ, tasks=[TaskSpec(name=PHRASE, uri=f"file://{broken}")])
    run, path = make_run(tmp_path, "evaluate", spec, {"teacher": tiny_teacher}, dataset=tiny_dataset, stage="eval")
    code, summary, output = run_stage("evaluate", path, tmp_path, env={"TRANSFORMERS_VERBOSITY": "info"})  # logs each load
    assert code == 11, output[-3000:]
    assert summary.reason == "InvalidInput" and f"names the data file {PHRASE}.train.jsonl" in summary.message
    assert "Traceback" not in output and "loading weights file" not in output


def test_tasks_and_min_recovery_unset_leave_an_evaluate_digest_as_before():
    from kondense.api import Resources, Stage
    from kondense.plan import _identity

    stage = Stage(name="eval", evaluate=EvaluateSpec(of=["teacher"], gates=Gates(max_perplexity_increase=0.1)))
    doc = _identity(stage, Resources())
    assert "tasks" not in doc and "minRecovery" not in doc["gates"]
    # promptTokens and speedBatch are in: they came with a new way of timing (prefill and decode apart, two
    # batch sizes, peak runtime memory), so a report made before them is made again, never reused for it.
    assert set(doc) == {"of", "baseline", "gates", "seqLength", "maxEvalTokens", "generateTokens", "promptTokens", "speedBatch"}
    with_tasks = Stage(name="eval", evaluate=EvaluateSpec(of=["teacher"], tasks=[TaskSpec(name="arc_easy", limit=5)],
                                                          gates=Gates(min_recovery=0.9)))
    doc = _identity(with_tasks, Resources())
    assert doc["tasks"] == [{"name": "arc_easy", "uri": None, "numFewshot": 0, "limit": 5, "minRecovery": None}]
    assert doc["gates"]["minRecovery"] == 0.9
