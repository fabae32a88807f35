"""The evaluate stage through its real entrypoint, and its quality gates as a pure function.

Variants: the trained tiny teacher, the random tiny student (same tokenizer) and an NF4
quantization of the teacher made by the quantize stage (plus a GGUF q8_0 one where llama.cpp is
installed). Perplexities are checked against an independent computation from the logits.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from kondense.api import DatasetRef, EvaluateSpec, Gates, InputRef, QuantizeSpec
from kondense.events import parse_line
from kondense.store import FileStore

SEQ = 64
MAX_TOKENS = 2048
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("kondense_jobs.gguf") is not None


def quantized(tmp_path_factory, make_run, run_stage, tiny_teacher, tiny_dataset, config: QuantizeSpec, name: str) -> InputRef:
    """The teacher quantized by the real quantize stage, as the artifact evaluate receives."""
    tmp = tmp_path_factory.mktemp(name)
    run, spec = make_run(tmp, "quantize", config, {"model": tiny_teacher}, dataset=tiny_dataset, stage=name)
    code, _, output = run_stage("quantize", spec, tmp)
    assert code == 0, output[-3000:]
    return InputRef(uri=run.output, stage=name, input_digest=run.input_digest)


@pytest.fixture
def nf4(tmp_path_factory, make_run, run_stage, tiny_teacher, tiny_dataset) -> InputRef:
    return quantized(tmp_path_factory, make_run, run_stage, tiny_teacher, tiny_dataset, QuantizeSpec(method="bnb-nf4"), "nf4")


@pytest.fixture(scope="module")
def reference_perplexity(tiny_teacher, tiny_dataset):
    """Perplexity from the logits, on the windows evaluate must use: (model_dir) -> float."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kondense_jobs import data

    ref = DatasetRef(uri=f"file://{tiny_dataset}", eval_split=0.1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    stream = data.token_stream(tokenizer, data.texts(data.load(tiny_dataset, ref).eval, ref))
    ids = torch.tensor(data.windows(stream, SEQ, limit=MAX_TOKENS))

    def compute(model_dir) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits
        return math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item())

    return compute


def evaluate(tmp_path, make_run, run_stage, tiny_dataset, models: dict, **config):
    spec = EvaluateSpec(of=list(models), seq_length=SEQ, max_eval_tokens=MAX_TOKENS, generate_tokens=8, **config)
    run, path = make_run(tmp_path, "evaluate", spec, models, dataset=tiny_dataset, stage="eval")
    code, summary, output = run_stage("evaluate", path, tmp_path)
    return run, code, summary, output


@pytest.mark.slow
def test_report_of_teacher_student_and_nf4(tmp_path, make_run, run_stage, tiny_teacher, tiny_student, tiny_dataset, nf4, reference_perplexity):
    models = {"teacher": tiny_teacher, "student": tiny_student, "nf4": nf4}
    run, code, summary, output = evaluate(
        tmp_path, make_run, run_stage, tiny_dataset, models, gates=Gates(max_perplexity_increase=0.05, applies_to=["nf4"])
    )
    assert code == 0, output[-3000:]
    assert summary.state == "Succeeded"

    # The summary's report: rows in `of` order, sane numbers.
    report = summary.report
    assert report.uri == run.output and report.baseline == "teacher"
    assert [r.variant for r in report.table] == ["teacher", "student", "nf4"]
    rows = {r.variant: r for r in report.table}
    assert all(math.isfinite(r.perplexity) and r.perplexity > 1 for r in report.table)
    assert rows["teacher"].perplexity < rows["student"].perplexity / 2  # trained vs random
    assert rows["teacher"].perplexity == pytest.approx(reference_perplexity(tiny_teacher), rel=1e-4)
    assert rows["student"].perplexity == pytest.approx(reference_perplexity(tiny_student), rel=1e-4)
    assert abs(rows["nf4"].perplexity / rows["teacher"].perplexity - 1) < 0.02
    assert rows["nf4"].size_bytes < rows["teacher"].size_bytes
    assert rows["nf4"].parameters == rows["teacher"].parameters  # logical count, not packed storage
    assert rows["student"].parameters < rows["teacher"].parameters
    assert all(r.tokens_per_second > 0 for r in report.table)

    # Progress: one line per variant and a final one, phase "variants".
    progress = [e for e in map(parse_line, output.splitlines()) if e and e["kondense"] == "progress"]
    assert [(e["step"], e["total"]) for e in progress if e.get("phase") == "variants"] == [(0, 3), (1, 3), (2, 3), (3, 3)]

    # The published report: files, manifest extra (what the local runner and the operator read).
    out = FileStore.path(run.output)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "report"
    assert set(manifest["files"]) == {"report.json", "report.md", "plot.png"}
    assert manifest["extra"]["gate"]["passed"] is True
    assert manifest["extra"]["report"] == summary.report.dump()
    nf4_row = next(r for r in summary.report.table if r.variant == "nf4")
    teacher_row = next(r for r in summary.report.table if r.variant == "teacher")
    assert (summary.report.best, summary.report.size_reference) == ("nf4", "teacher")
    assert summary.report.best_size_ratio == round(nf4_row.size_bytes / teacher_row.size_bytes, 4) < 1
    doc = json.loads((out / "report.json").read_text())
    assert [v["variant"] for v in doc["variants"]] == ["teacher", "student", "nf4"]
    assert doc["setup"]["windows"] == MAX_TOKENS // SEQ and doc["setup"]["seq_length"] == SEQ
    assert all(v["memory_bytes"] > 0 for v in doc["variants"])
    assert doc["variants"][2]["memory_bytes"] < doc["variants"][0]["memory_bytes"]
    assert doc["gate"]["passed"] and [c["variant"] for c in doc["gate"]["checks"]] == ["nf4"]
    md = (out / "report.md").read_text()
    assert "| teacher (baseline) | hf |" in md and "| student |" in md and "| nf4 |" in md and "PASS nf4" in md
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_failed_gate_exits_13_and_still_publishes_the_report(tmp_path, make_run, run_stage, tiny_teacher, tiny_student, tiny_dataset):
    models = {"teacher": tiny_teacher, "student": tiny_student}
    run, code, summary, output = evaluate(tmp_path, make_run, run_stage, tiny_dataset, models, gates=Gates(max_perplexity_increase=0.0))
    assert code == 13, output[-3000:]
    assert summary.reason == "QualityGateFailed"
    # e.g. "student: perplexity 1022.7 is +380.12% over teacher (212.8); gate maxPerplexityIncrease 0"
    out = FileStore.path(run.output)
    doc = json.loads((out / "report.json").read_text())
    ppl = {v["variant"]: v["perplexity"] for v in doc["variants"]}
    increase = ppl["student"] / ppl["teacher"] - 1
    assert summary.message == (
        f"student: perplexity {ppl['student']:.1f} is +{increase * 100:.2f}% over teacher ({ppl['teacher']:.1f}); "
        "gate maxPerplexityIncrease 0"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["gate"] == {"passed": False, "message": summary.message}
    assert [r["variant"] for r in manifest["extra"]["report"]["table"]] == ["teacher", "student"]
    assert "**Failed**" in (out / "report.md").read_text()
    assert "Traceback" not in output


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python or kondense_jobs.gguf not installed")
def test_gguf_variant_on_the_same_windows(tmp_path, tmp_path_factory, make_run, run_stage, tiny_teacher, tiny_dataset):
    gguf = quantized(tmp_path_factory, make_run, run_stage, tiny_teacher, tiny_dataset, QuantizeSpec(method="gguf", type="q8_0"), "gguf")
    models = {"teacher": tiny_teacher, "gguf": gguf}
    run, code, summary, output = evaluate(tmp_path, make_run, run_stage, tiny_dataset, models, gates=Gates(max_perplexity_increase=0.005))
    assert code == 0, output[-3000:]
    rows = {r.variant: r for r in summary.report.table}
    # Same windows, same convention: q8_0 through llama.cpp lands within half a percent of fp32 through transformers.
    assert abs(rows["gguf"].perplexity / rows["teacher"].perplexity - 1) < 0.005
    gguf_file = next(FileStore.path(gguf.uri).glob("*.gguf"))
    assert rows["gguf"].size_bytes == gguf_file.stat().st_size < rows["teacher"].size_bytes
    assert rows["gguf"].parameters == pytest.approx(rows["teacher"].parameters, rel=0.01)
    assert rows["gguf"].tokens_per_second > 0
    doc = json.loads((FileStore.path(run.output) / "report.json").read_text())
    assert [v["format"] for v in doc["variants"]] == ["hf", "gguf"]


# --------------------------------------------------------------------------------------------
# Gates, pure
# --------------------------------------------------------------------------------------------


def _m(variant: str, ppl: float, tps: float = 100.0, size: int = 1):
    from kondense_jobs.report import Measurement

    return Measurement(variant=variant, format="hf", size_bytes=size, parameters=1, memory_bytes=1, perplexity=ppl,
                       tokens_per_second=tps)


@pytest.mark.parametrize(
    "gates, measurements, passed, message",
    [
        (Gates(), [_m("base", 100), _m("q", 500)], True, "no quality gates set"),
        (
            Gates(max_perplexity_increase=0.05),
            [_m("base", 100), _m("q", 104)],
            True,
            "all quality gates passed: q: perplexity 104.0 is +4.00% over base (100.0); gate maxPerplexityIncrease 0.05",
        ),
        (
            Gates(max_perplexity_increase=0.03),
            [_m("base", 234.3), _m("gguf", 245.1)],
            False,
            "gguf: perplexity 245.1 is +4.61% over base (234.3); gate maxPerplexityIncrease 0.03",
        ),
        (
            Gates(max_perplexity_increase=0.0),
            [_m("base", 100), _m("q", 99)],
            True,
            "all quality gates passed: q: perplexity 99.0 is 1.00% under base (100.0); gate maxPerplexityIncrease 0",
        ),
        (
            Gates(max_perplexity_increase=0.1, applies_to=["b"]),
            [_m("base", 100), _m("a", 900), _m("b", 101)],
            True,
            "all quality gates passed: b: perplexity 101.0 is +1.00% over base (100.0); gate maxPerplexityIncrease 0.1",
        ),
        (
            Gates(min_tokens_per_second=50),
            [_m("base", 100), _m("slow", 100, tps=12.34)],
            False,
            "slow: 12.3 tokens/s is below gate minTokensPerSecond 50",
        ),
        (
            Gates(max_perplexity_increase=0.1),
            [_m("base", 100), _m("broken", float("nan"))],
            False,
            "broken: perplexity nan against base (100) is not a finite number; gate maxPerplexityIncrease 0.1",
        ),
        (
            Gates(max_perplexity_increase=0.01, min_tokens_per_second=50),
            [_m("base", 100), _m("a", 110, tps=10), _m("b", 100.5)],
            False,
            "a: perplexity 110.0 is +10.00% over base (100.0); gate maxPerplexityIncrease 0.01; "
            "a: 10 tokens/s is below gate minTokensPerSecond 50",
        ),
    ],
    ids=["none", "within", "over", "equal-or-better", "applies-to", "too-slow", "nan", "several"],
)
def test_gates(gates, measurements, passed, message):
    from kondense_jobs.evaluate import check_gates

    result = check_gates(gates, "base", measurements)
    assert (result.passed, result.message) == (passed, message)


@pytest.mark.parametrize(
    "measurements, failing, best",
    [
        ([_m("teacher", 10, size=100), _m("a", 11, size=40), _m("b", 12, size=20)], set(), ("b", 0.2, "teacher")),
        ([_m("teacher", 10, size=100), _m("a", 11, size=40), _m("b", 30, size=20)], {"b"}, ("a", 0.4, "teacher")),
        ([_m("base", 10, size=50), _m("a", 11, size=25), _m("b", 10.5, size=25)], set(), ("b", 0.5, "base")),
        ([_m("teacher", 10, size=100), _m("student", 99, size=1), _m("a", 30, size=40)], {"a"}, None),
    ],
    ids=["smallest", "smallest-that-passed", "tie-lower-perplexity-against-baseline", "none-passed-sources-aside"],
)
def test_best_variant_is_the_smallest_that_passed_its_gates(measurements, failing, best):
    from kondense_jobs.report import Check, GateResult, best_variant

    checks = [Check(m.variant, "maxPerplexityIncrease", 0, 0, m.variant not in failing, "") for m in measurements]
    assert best_variant(measurements, GateResult(not failing, "", checks), "base") == best
