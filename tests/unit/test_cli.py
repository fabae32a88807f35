"""The `kondense` command's answers to bad input: one clear message, non-zero exit, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def kondense(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    return subprocess.run([sys.executable, "-m", "kondense.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120, env=env)


def write(tmp_path: Path, doc) -> Path:
    p = tmp_path / "pipeline.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


def demo(tmp_path: Path) -> dict:
    doc = yaml.safe_load((ROOT / "crds/examples/demo.yaml").read_text())
    text = yaml.safe_dump(doc).replace("s3://kondense-demo", f"file://{tmp_path}/base")
    return yaml.safe_load(text)


def test_validate_accepts_the_examples(tmp_path):
    r = kondense("validate", *map(str, sorted((ROOT / "crds/examples").glob("*.yaml"))), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "demo.yaml: valid (demo, 6 stages)" in r.stdout


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["spec"]["stages"][3]["quantize"].update(bits=5), "spec.stages[3].quantize.bits: must be one of 4, 8"),
        (lambda d: d["spec"]["stages"].append({"name": "x", "from": "eval", "quantize": {"method": "gguf"}}),
         "spec.stages[6].from: 'eval' is a evaluate stage"),
        (lambda d: d["spec"].update(stages=[{"name": "a", "from": "b", "quantize": {"method": "gguf"}},
                                            {"name": "b", "from": "a", "distill": {}}]),
         "spec.stages[0].from: 'b' must be an earlier stage (stages run in DAG order; no cycles)"),
        (lambda d: d["spec"]["stages"][0]["distill"].update(batchSize=0), "spec.stages[0].distill.batchSize: must be >= 1"),
        (lambda d: d["spec"]["dataset"].update(evalSplit=1.5), "spec.dataset.evalSplit: must be < 1"),
        (lambda d: d["spec"]["storage"].update(bucket="x"), "spec.storage.bucket: unknown field"),
    ],
    ids=["out-of-range-enum", "from-names-evaluate", "cycle", "batch-zero", "split-too-big", "unknown-field"],
)
def test_validate_and_run_reject_bad_input_naming_the_field(tmp_path, mutate, expected):
    doc = demo(tmp_path)
    mutate(doc)
    path = write(tmp_path, doc)
    for command in ("validate", "run"):
        r = kondense(command, str(path), cwd=tmp_path)
        assert r.returncode != 0
        assert expected in r.stderr, r.stderr
    assert not (tmp_path / "base").exists() and not (tmp_path / ".kondense").exists()


def test_malformed_yaml(tmp_path):
    r = kondense("run", str(write(tmp_path, "spec: {stages: [\n")), cwd=tmp_path)
    assert r.returncode == 2 and "malformed YAML at line" in r.stderr


def test_unreachable_store_fails_fast_and_writes_nothing(tmp_path):
    doc = demo(tmp_path)
    doc["spec"]["storage"] = {"uri": "s3://bucket/prefix", "endpoint": "http://127.0.0.1:9"}
    r = kondense("run", str(write(tmp_path, doc)), cwd=tmp_path)
    assert r.returncode == 2 and "cannot reach the S3 endpoint" in r.stderr, r.stderr
    assert r.stderr.count("\n") <= 2, "one clear message, no traceback"
    assert not (tmp_path / ".kondense" / "default" / "demo" / "status.json").exists()


def test_missing_credentials(tmp_path, monkeypatch):
    doc = demo(tmp_path)
    doc["spec"]["storage"] = {"uri": "s3://bucket/prefix", "endpoint": "http://127.0.0.1:9"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent", AWS_EC2_METADATA_DISABLED="true")
    r = subprocess.run([sys.executable, "-m", "kondense.cli", "run", str(write(tmp_path, doc))], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 2 and "no S3 credentials" in r.stderr, r.stderr


def test_report_of_an_unfinished_pipeline(tmp_path):
    r = kondense("report", str(write(tmp_path, demo(tmp_path))), cwd=tmp_path)
    assert r.returncode == 2 and "report.json does not exist" in r.stderr


def test_report_of_a_report_json_prints_kld_top1_and_what_is_missing(tmp_path):
    """`kondense report <uri>`: the table with KLD and top-1 per variant, n/a and why for the rest."""
    import json

    rows = [
        {"variant": "distill", "sizeBytes": 5 * 2**20, "parameters": 1_480_000, "perplexity": 272.3,
         "tokensPerSecond": 606.0, "klDivergence": 0.0, "top1Agreement": 1.0,
         "memoryBytes": 30 * 2**20, "engine": "transformers (cpu)", "batch": 8, "batchTokensPerSecond": 2500.0},
        {"variant": "gguf", "sizeBytes": 2**20, "parameters": 1_480_000, "perplexity": 272.26,
         "tokensPerSecond": 5016.4, "klDivergence": 0.00123, "top1Agreement": 0.9876,
         "memoryBytes": 12 * 2**20, "engine": "llama.cpp (cpu)", "batch": 8, "batchTokensPerSecond": 9000.0},
        {"variant": "q4", "missing": "stage q4 failed: OOMKilled: out of memory"},
        {"variant": "odd", "sizeBytes": 2**20, "perplexity": 280.0, "note": "KLD and top-1 n/a: another vocabulary"},
    ]
    (tmp_path / "report.json").write_text(json.dumps({"uri": f"file://{tmp_path}", "baseline": "distill", "table": rows}))
    r = kondense("report", f"file://{tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == [
        "variant", "size", "params", "perplexity", "KLD", "top-1", "memory", "decode/s", "b1", "b8", "engine"
    ]
    assert lines[2].split() == [
        "distill", "*", "5.0", "MiB", "1.48M", "272.30", "0.0000", "100.00%", "30.0", "MiB", "606.0", "2500.0",
        "transformers", "(cpu)",
    ]
    assert lines[3].split() == [
        "gguf", "1.0", "MiB", "1.48M", "272.26", "(-0.01%)", "0.0012", "98.76%", "12.0", "MiB", "5016.4", "9000.0",
        "llama.cpp", "(cpu)",
    ]
    assert lines[4].split() == ["q4", "-", "-", "n/a", "n/a", "n/a", "-", "-", "-", "-"]
    assert lines[5].split()[-6:] == ["n/a", "n/a", "-", "-", "-", "-"]  # a report of before the speed columns
    assert "n/a: q4: not evaluated: stage q4 failed: OOMKilled: out of memory" in lines
    assert "n/a: odd: KLD and top-1 n/a: another vocabulary" in lines


def test_report_prints_task_scores_recovery_and_why_a_score_is_n_a(tmp_path):
    """`kondense report <uri>`: with evaluate.tasks, a second table: score ± stderr (recovery) per task, the mean recovery."""
    import json

    def task(name, score, stderr, recovery=None, note=None):
        return {k: v for k, v in {"task": name, "score": score, "stderr": stderr, "recovery": recovery, "note": note}.items()
                if v is not None}

    rows = [
        {"variant": "distill", "sizeBytes": 2**20, "perplexity": 272.3, "recovery": 1.0,
         "tasks": [task("next-word", 0.6, 0.08, 1.0), task("phrase", 0.25, 0.07, 1.0)]},
        {"variant": "gguf", "sizeBytes": 2**20, "perplexity": 272.4, "recovery": 0.975,
         "tasks": [task("next-word", 0.57, 0.081, 0.95), task("phrase", 0.25, 0.07, 1.0)]},
        {"variant": "odd", "sizeBytes": 2**20, "perplexity": 280.0,
         "tasks": [task("next-word", None, None, note="next-word n/a: token 5 is 'x' in the file"), task("phrase", 0.1, 0.05, 0.4)]},
        {"variant": "q4", "missing": "stage q4 failed: OOMKilled"},
    ]
    (tmp_path / "report.json").write_text(json.dumps({"uri": f"file://{tmp_path}", "baseline": "distill", "table": rows}))
    r = kondense("report", f"file://{tmp_path}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("variant") and "recovery" in line))
    assert lines[at].split() == ["variant", "next-word", "phrase", "recovery"]
    assert lines[at + 2].split() == ["distill", "*", "0.600", "±", "0.080", "0.250", "±", "0.070", "-"]
    assert lines[at + 3].split() == ["gguf", "0.570", "±", "0.081", "(95%)", "0.250", "±", "0.070", "(100%)", "97.5%"]
    assert lines[at + 4].split() == ["odd", "n/a", "0.100", "±", "0.050", "(40%)", "n/a"]
    assert lines[at + 5].split() == ["q4", "n/a", "n/a", "n/a"]
    assert "n/a: odd: next-word n/a: token 5 is 'x' in the file" in lines
