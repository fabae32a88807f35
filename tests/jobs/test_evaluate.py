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

from kondense.api import DatasetRef, EvaluateSpec, Gates, InputRef, QuantizeSpec, Report
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
def nf4(teacher_quantized) -> InputRef:
    return teacher_quantized("nf4")


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
    # Speed and memory, the same way for every variant: the same prompts, batch 1 and 8, peak runtime memory.
    assert doc["setup"]["speed_batches"] == [1, 8] and doc["setup"]["prompt_tokens"] == 64
    for v in doc["variants"]:
        assert v["engine"] == "transformers (cpu)" and v["memory_note"] is None
        assert [t["batch"] for t in v["speed"]] == [1, 8]
        assert all(t["prefill_tokens_per_second"] > 0 and t["decode_tokens_per_second"] > 0 for t in v["speed"])
        assert v["tokens_per_second"] == v["speed"][0]["decode_tokens_per_second"]
        assert v["memory_bytes"] >= v["size_bytes"] * 0.9, v  # the weights are resident while generating
    assert rows["nf4"].engine == "transformers (cpu)" and rows["nf4"].memory_bytes == doc["variants"][2]["memory_bytes"]
    assert (rows["nf4"].batch, rows["nf4"].batch_tokens_per_second) == (8, doc["variants"][2]["speed"][1]["decode_tokens_per_second"])
    assert doc["gate"]["passed"] and [c["variant"] for c in doc["gate"]["checks"]] == ["nf4"]
    md = (out / "report.md").read_text()
    assert "| teacher (baseline) | hf |" in md and "| student |" in md and "| nf4 |" in md and "PASS nf4" in md
    assert "## Speed and memory" in md and "| prefill b1 | decode b1 | prefill b8 | decode b8 | peak memory |" in md
    assert "| nf4 | bnb-nf4 | transformers, vLLM |" in md and "Fallback quantization" not in md
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
    config = QuantizeSpec(method="gguf", type="q4_k_m", calibration_samples=4, calibration_seq_length=64)  # + imatrix
    gguf = quantized(tmp_path_factory, make_run, run_stage, tiny_teacher, tiny_dataset, config, "gguf")
    models = {"teacher": tiny_teacher, "gguf": gguf}
    run, code, summary, output = evaluate(tmp_path, make_run, run_stage, tiny_dataset, models, gates=Gates(max_perplexity_increase=0.005))
    assert code == 0, output[-3000:]
    rows = {r.variant: r for r in summary.report.table}
    # Same windows, same convention: q4_k_m (q5_0 on these 128-wide rows) through llama.cpp lands within half a
    # percent of fp32 through transformers.
    assert abs(rows["gguf"].perplexity / rows["teacher"].perplexity - 1) < 0.005
    gguf_file = next(FileStore.path(gguf.uri).glob("*.gguf"))
    assert rows["gguf"].size_bytes == gguf_file.stat().st_size < rows["teacher"].size_bytes
    assert rows["gguf"].parameters == pytest.approx(rows["teacher"].parameters, rel=0.01)
    assert rows["gguf"].tokens_per_second > 0
    doc = json.loads((FileStore.path(run.output) / "report.json").read_text())
    assert [v["format"] for v in doc["variants"]] == ["hf", "gguf"]
    # Timed and measured as the HF variant is: batch 1 and 8, peak runtime memory (not the file size).
    assert [v["engine"] for v in doc["variants"]] == ["transformers (cpu)", "llama.cpp (cpu)"]
    assert [t["batch"] for t in doc["variants"][1]["speed"]] == [1, 8]
    assert doc["variants"][1]["memory_bytes"] > rows["gguf"].size_bytes
    # How each was made and what loads it; the teacher's 128-wide rows fell back from the 256-blocks, and the report says so.
    made = json.loads((FileStore.path(gguf.uri) / "manifest.json").read_text())["metrics"]
    assert [(v["made_by"], v["loads_in"]) for v in doc["variants"]] == [
        ("source", "transformers, vLLM"), ("gguf q4_k_m + imatrix", "llama.cpp, transformers (dequantized)")
    ]
    assert doc["variants"][1]["fallback_tensors"] == made["ggufFallbackTensors"] > 0 and made["imatrixWindows"] == 4
    md = (FileStore.path(run.output) / "report.md").read_text()
    assert "| gguf | gguf q4_k_m + imatrix | llama.cpp, transformers (dequantized) |" in md
    assert f"- gguf: {made['ggufFallbackTensors']:.0f} tensors' rows do not divide the type's 256-block" in md


# --------------------------------------------------------------------------------------------
# Divergence from the baseline: KL(baseline || variant) and top-1 agreement
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory, tiny_teacher):
    """The teacher with gaussian noise on every weight: close to it, not the same."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("perturbed")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3 * p.std())
    model.save_pretrained(out)
    for f in tiny_teacher.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def reference_divergence(tiny_teacher, tiny_dataset):
    """Full-vocabulary KL(teacher || model) and top-1 agreement from the logits, in float64: (model_dir) -> (kl, top1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kondense_jobs import data

    ref = DatasetRef(uri=f"file://{tiny_dataset}", eval_split=0.1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    stream = data.token_stream(tokenizer, data.texts(data.load(tiny_dataset, ref).eval, ref))
    ids = torch.tensor(data.windows(stream, SEQ, limit=MAX_TOKENS))

    def logp(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.inference_mode():
            return torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), dim=-1)

    base = logp(tiny_teacher)

    def compute(model_dir) -> tuple[float, float]:
        other = logp(model_dir)
        kl = (base.exp() * (base - other)).sum(-1).mean().item()
        return kl, (base.argmax(-1) == other.argmax(-1)).double().mean().item()

    return compute


@pytest.mark.slow
def test_kld_is_zero_against_itself_and_positive_for_a_perturbed_model(
    tmp_path, make_run, run_stage, tiny_teacher, tiny_dataset, perturbed, reference_divergence
):
    models = {"teacher": tiny_teacher, "copy": tiny_teacher, "perturbed": perturbed}
    run, code, summary, output = evaluate(
        tmp_path, make_run, run_stage, tiny_dataset, models, gates=Gates(max_kl_divergence=0.001, min_top1_agreement=0.5)
    )
    assert code == 13, output[-3000:]  # the perturbed model fails the KLD gate
    manifest = json.loads((FileStore.path(run.output) / "manifest.json").read_text())
    rows = {r.variant: r for r in Report.model_validate(manifest["extra"]["report"]).table}
    assert (rows["teacher"].kl_divergence, rows["teacher"].top1_agreement) == (0.0, 1.0)  # the baseline itself
    assert rows["copy"].kl_divergence == pytest.approx(0.0, abs=1e-12) and rows["copy"].top1_agreement == 1.0
    kl, top1 = reference_divergence(perturbed)
    assert kl > 0.001
    # 2016 positions x 1024 tokens fit KL_FULL_BYTES: the whole distributions, exact.
    assert rows["perturbed"].kl_divergence == pytest.approx(kl, rel=1e-6)
    assert rows["perturbed"].top1_agreement == pytest.approx(top1, abs=1e-9) and top1 < 1
    ours = rows["perturbed"].kl_divergence
    assert summary.reason == "QualityGateFailed"
    assert summary.message == f"perturbed: KL divergence from teacher {ours:.4f} exceeds gate maxKLDivergence 0.001"
    doc = json.loads((FileStore.path(run.output) / "report.json").read_text())
    assert {c["variant"]: c["passed"] for c in doc["gate"]["checks"] if c["gate"] == "maxKLDivergence"} == {
        "copy": True, "perturbed": False
    }
    assert doc["setup"]["kl_top_k"] == 1024  # the whole vocabulary
    md = (FileStore.path(run.output) / "report.md").read_text()
    assert f"| {ours:.4f} | {rows['perturbed'].top1_agreement * 100:.2f}% |" in md
    metrics = manifest["metrics"]
    assert metrics["perturbed.klDivergence"] == round(ours, 6) and "teacher.klDivergence" not in metrics


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python or kondense_jobs.gguf not installed")
def test_gguf_exports_diverge_little_from_their_source(tmp_path, make_run, run_stage, tiny_teacher, tiny_dataset, teacher_quantized):
    f32, q8 = teacher_quantized("f32"), teacher_quantized("q8_0")
    models = {"teacher": tiny_teacher, "f32": f32, "q8": q8}
    run, code, summary, output = evaluate(
        tmp_path, make_run, run_stage, tiny_dataset, models, gates=Gates(max_kl_divergence=0.01, min_top1_agreement=0.95)
    )
    assert code == 0, output[-3000:]
    rows = {r.variant: r for r in summary.report.table}
    print({n: (r.kl_divergence, r.top1_agreement) for n, r in rows.items()})
    assert rows["f32"].kl_divergence < 1e-5 and rows["f32"].top1_agreement > 0.995  # the same weights, another runtime
    assert rows["f32"].kl_divergence < rows["q8"].kl_divergence < 0.01
    assert rows["q8"].top1_agreement > 0.95
    assert rows["f32"].note is None and rows["q8"].note is None  # one vocabulary, checked token by token


@pytest.mark.slow
def test_missing_variants_are_listed_with_their_reason(tmp_path, make_run, run_stage, tiny_teacher, tiny_student, tiny_dataset):
    """onMissingVariant: skip, as the StageRun says it: the variants that exist are evaluated, the
    missing one is in every form of the report with the reason of its stage."""
    why = "stage q4 failed: OOMKilled: the container ran out of memory"
    spec = EvaluateSpec(of=["teacher", "q4", "student"], seq_length=SEQ, max_eval_tokens=MAX_TOKENS, generate_tokens=8,
                        on_missing_variant="skip", gates=Gates(max_kl_divergence=100.0))
    models = {"teacher": tiny_teacher, "student": tiny_student}
    run, path = make_run(tmp_path, "evaluate", spec, models, dataset=tiny_dataset, stage="eval", missing={"q4": why})
    code, summary, output = run_stage("evaluate", path, tmp_path)
    assert code == 0, output[-3000:]
    table = summary.report.table
    assert [(r.variant, r.missing) for r in table] == [("teacher", None), ("q4", why), ("student", None)]
    assert table[1].perplexity is None and table[1].kl_divergence is None and table[1].size_bytes is None
    assert summary.report.best is None  # teacher and student aside, nothing was evaluated
    out = FileStore.path(run.output)
    doc = json.loads((out / "report.json").read_text())
    assert doc["missing"] == [{"variant": "q4", "reason": why}]
    assert [v["variant"] for v in doc["variants"]] == ["teacher", "student"]
    assert [(c["variant"], c["passed"]) for c in doc["gate"]["checks"]] == [("student", True), ("q4", None)]
    assert doc["gate"]["message"].startswith("quality gates passed on the variants evaluated: ")
    md = (out / "report.md").read_text()
    assert "| q4 | not evaluated |" in md and f"- q4: not evaluated: {why}" in md and f"- N/A q4: n/a, not evaluated: {why}" in md
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["missing"] == {"q4": why}

    # report.json's keys are an interface (documented in kondense_jobs/report.py): pinned here.
    assert list(doc) == ["uri", "baseline", "setup", "variants", "missing", "gate", "table"]
    assert list(doc["variants"][0]) == [
        "variant", "format", "size_bytes", "parameters", "memory_bytes", "perplexity", "tokens_per_second",
        "kl_divergence", "top1_agreement", "note", "seconds", "perplexity_increase", "tasks", "recovery",
        "made_by", "loads_in", "fallback_tensors", "engine", "speed", "memory_note",
    ]
    assert list(doc["variants"][0]["speed"][0]) == ["batch", "prefill_tokens_per_second", "decode_tokens_per_second"]
    assert [(v["made_by"], v["loads_in"], v["fallback_tensors"]) for v in doc["variants"]] == [
        ("source", "transformers, vLLM", None), ("source", "transformers, vLLM", None)
    ]
    assert list(doc["missing"][0]) == ["variant", "reason"]
    assert list(doc["gate"]) == ["passed", "message", "checks"]
    assert list(doc["gate"]["checks"][0]) == ["variant", "gate", "value", "limit", "passed", "text", "task"]
    assert set(doc["setup"]) == {
        "seq_length", "windows", "tokens", "prompt_tokens", "generate_tokens", "kl_top_k", "gates", "tasks", "lm_eval",
        "speed_batches",
    }
    assert (doc["setup"]["tasks"], doc["setup"]["lm_eval"], doc["variants"][0]["tasks"]) == ([], None, [])
    assert set(doc["table"][0]) <= {
        "variant", "sizeBytes", "parameters", "perplexity", "tokensPerSecond", "klDivergence", "top1Agreement", "note",
        "missing", "tasks", "recovery", "memoryBytes", "engine", "batch", "batchTokensPerSecond",
    }  # the task keys of report.json: tests/jobs/test_tasks.py


# --------------------------------------------------------------------------------------------
# Gates, pure
# --------------------------------------------------------------------------------------------


def _m(variant: str, ppl: float, tps: float = 100.0, size: int = 1, **divergence):
    from kondense_jobs.report import Measurement

    return Measurement(variant=variant, format="hf", size_bytes=size, parameters=1, memory_bytes=1, perplexity=ppl,
                       tokens_per_second=tps, **divergence)


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
        (
            Gates(max_kl_divergence=0.05),
            [_m("base", 100), _m("q", 101, kl_divergence=0.0123)],
            True,
            "all quality gates passed: q: KL divergence from base 0.0123 is within gate maxKLDivergence 0.05",
        ),
        (
            Gates(max_kl_divergence=0.05),
            [_m("base", 100), _m("q4", 130, kl_divergence=0.2817)],
            False,
            "q4: KL divergence from base 0.2817 exceeds gate maxKLDivergence 0.05",
        ),
        (
            Gates(max_kl_divergence=0.05),
            [_m("base", 100), _m("gguf", 101, note="KLD and top-1 n/a: logits over 32000 tokens, the baseline base's over 32064")],
            False,
            "gguf: KL divergence from base n/a (KLD and top-1 n/a: logits over 32000 tokens, the baseline base's over 32064); "
            "gate maxKLDivergence 0.05",
        ),
        (
            Gates(min_top1_agreement=0.9),
            [_m("base", 100), _m("q4", 130, top1_agreement=0.8123)],
            False,
            "q4: top-1 agreement with base 0.8123 is below gate minTop1Agreement 0.9",
        ),
    ],
    ids=["none", "within", "over", "equal-or-better", "applies-to", "too-slow", "nan", "several", "kld-within",
         "kld-over", "kld-n/a", "top1-below"],
)
def test_gates(gates, measurements, passed, message):
    from kondense_jobs.evaluate import check_gates

    result = check_gates(gates, "base", measurements)
    assert (result.passed, result.message) == (passed, message)


def test_a_missing_variant_is_listed_by_the_gates_and_fails_none():
    from kondense_jobs.evaluate import check_gates

    missing = {"q4": "stage q4 failed: OOMKilled"}
    result = check_gates(Gates(max_kl_divergence=0.05), "base", [_m("base", 100), _m("q", 101, kl_divergence=0.01)], missing)
    assert result.passed and [(c.variant, c.passed) for c in result.checks] == [("q", True), ("q4", None)]
    assert result.message == (
        "quality gates passed on the variants evaluated: q: KL divergence from base 0.0100 is within gate "
        "maxKLDivergence 0.05; q4: n/a, not evaluated: stage q4 failed: OOMKilled"
    )
    assert check_gates(Gates(), "base", [_m("base", 100)], missing).message == "no quality gates set"
    failing = check_gates(Gates(max_kl_divergence=0.05, applies_to=["q4", "q"]), "base",
                          [_m("base", 100), _m("q", 101, kl_divergence=0.5)], missing)
    assert not failing.passed and failing.message == "q: KL divergence from base 0.5000 exceeds gate maxKLDivergence 0.05"


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


def test_a_variant_that_could_not_be_measured_fails_its_gates_with_the_reason():
    from kondense_jobs.evaluate import check_gates
    from kondense_jobs.report import GateResult, Measurement, best_variant

    broken = Measurement("gguf", "gguf", None, None, None, None, None, note="not measured: llama.cpp cannot load it")
    result = check_gates(Gates(max_perplexity_increase=0.1, max_kl_divergence=0.1), "base", [_m("base", 100), broken])
    assert not result.passed and result.message == (
        "gguf: perplexity n/a (not measured: llama.cpp cannot load it); gate maxPerplexityIncrease 0.1; "
        "gguf: KL divergence from base n/a (not measured: llama.cpp cannot load it); gate maxKLDivergence 0.1"
    )
    # never the smallest: it has no size (and no TypeError comparing None)
    assert best_variant([_m("base", 100, size=10), broken], GateResult(True, "", []), "base") == ("base", 1.0, "base")


@pytest.mark.parametrize("budget, k", [(1 << 30, 512), (0, 64)], ids=["whole-distributions", "top-k-and-a-bucket"])
def test_divergence_against_the_stored_baseline(tmp_path, monkeypatch, budget, k):
    """Reference + Scores on random logits against full float64 KL(p || q) and argmax agreement:
    exact when the whole distributions are kept, a close lower bound with top-k and one bucket."""
    import torch

    from kondense_jobs import evaluate as ev

    monkeypatch.setattr(ev, "KL_FULL_BYTES", budget)
    monkeypatch.setattr(ev, "KL_TOP_K", 64)
    generator = torch.Generator().manual_seed(0)
    windows = [[int(t) for t in torch.randint(0, 512, (33,), generator=generator)] for _ in range(3)]
    base = [torch.randn(33, 512, generator=generator) * 3 for _ in windows]
    other = [b + torch.randn(33, 512, generator=generator) * 0.5 for b in base]
    reference = ev.Reference(tmp_path / "ref", 3 * 32)
    baseline, same, variant = ev.Scores(reference, "base"), ev.Scores(reference, "same"), ev.Scores(reference, "q")
    baseline.add_all(base, windows)
    same.add_all(base, windows)
    variant.add_all(other, windows)
    assert reference.k == k
    p = torch.cat([torch.log_softmax(b[:-1].double(), -1) for b in base])
    q = torch.cat([torch.log_softmax(o[:-1].double(), -1) for o in other])
    full = (p.exp() * (p - q)).sum(-1).mean().item()
    top1 = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    assert baseline.divergence() == {"kl_divergence": 0.0, "top1_agreement": 1.0}
    assert same.divergence() == {"kl_divergence": 0.0, "top1_agreement": 1.0}
    got = variant.divergence()
    assert got["top1_agreement"] == pytest.approx(top1, abs=1e-12) and 0.3 < top1 < 1
    if k == 512:
        assert got["kl_divergence"] == pytest.approx(full, rel=1e-9)
    else:
        assert 0.8 * full < got["kl_divergence"] < full
    nll = -sum(torch.log_softmax(b[:-1].double(), -1).gather(-1, torch.tensor(w[1:])[:, None]).sum().item()
               for b, w in zip(base, windows))
    assert baseline.perplexity() == pytest.approx(math.exp(nll / 96), rel=1e-12)
    reference.close()
    assert not list((tmp_path / "ref").glob("*.npy"))


def test_plot_labels_of_close_variants_do_not_overlap(tmp_path):
    """nf4 and gptq sit on top of each other in the demo (same size within 2%, perplexity within 0.1%):
    each label finds its own spot, none overlaps another, and every one stays inside its panel."""
    from kondense_jobs.report import MIB, plot

    def variant(name, mib, ppl, kld, recovery):
        return {"variant": name, "size_bytes": int(mib * MIB), "perplexity": ppl, "kl_divergence": kld, "recovery": recovery}

    doc = {
        "baseline": "distill",
        "setup": {"tasks": [{"name": "t"}]},
        "variants": [
            variant("teacher", 21.0, 441.2, 0.74, 0.59), variant("distill", 5.63, 277.6, 0.0, 1.0),
            variant("nf4", 4.24, 277.25, 0.0051, 1.0), variant("gptq", 4.26, 277.86, 0.0036, 1.0),
            variant("gptq-8bit", 4.42, 277.6, 0.0001, 1.0), variant("gguf", 1.62, 277.6, 0.0001, 1.0),
        ],
    }
    panels = plot(doc, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG" and len(panels) == 3
    for labels in panels:
        assert {"nf4", "gptq", "gptq-8bit", "teacher"} <= {name for name, _ in labels}
        overlapping = [(a, b) for i, (a, box) in enumerate(labels) for b, other in labels[i + 1:] if box.overlaps(other)]
        assert overlapping == []
    assert all(box.x1 <= 2340 for labels in panels for _, box in labels)  # none past the figure's right edge
