"""`kondense demo` and `kondense run` end to end: real stages as subprocesses, file:// and s3:// stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from kondense import preload
from kondense.store import FileStore, S3Store, to_uri

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def kondense(*args, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kondense.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's first command's pipeline, run once into a fresh folder."""
    work = tmp_path_factory.mktemp("demo")
    started = time.monotonic()
    r = kondense("demo", "--base", str(work / "base"), cwd=work)
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work, r, elapsed


def test_demo_runs_every_stage_and_prints_the_table(demo_run):
    work, r, elapsed = demo_run
    assert "Stages run: distill, ce-only, nf4, gptq, gguf, eval" in r.stdout
    # On a machine without a GPU every stage forks from the preloaded interpreter (kondense.preload).
    assert ("6 forked from a preloaded interpreter" in r.stdout) == (not preload.gpu_devices()), r.stdout
    # Each stage's wall time, as the operator's kondense_stage_duration_seconds counts it.
    took = dict(re.findall(r"^  (\S+)\s+\S+/\S+\s+Succeeded\s+([0-9.]+)s$", r.stdout, re.M))
    assert set(took) == {"distill", "ce-only", "nf4", "gptq", "gguf", "eval"}, r.stdout
    assert all(0 < float(t) <= elapsed for t in took.values()), took
    for variant in ("teacher", "student", "ce-only", "distill *", "nf4", "gptq", "gguf"):
        assert f"\n{variant} " in r.stdout, r.stdout
    status = json.loads((work / ".kondense/default/demo/status.json").read_text())["status"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Ready"] == "True" and conditions["QualityGatePassed"] == "True", conditions
    report_dir = FileStore.path(status["report"]["uri"])
    assert {"report.json", "report.md", "plot.png", "manifest.json"} <= {p.name for p in report_dir.iterdir()}
    rows = {row["variant"]: row for row in status["report"]["table"]}
    # The teacher (trained on the dataset's domain) is best, then the distilled student, at least 10% below the
    # same training without the teacher, then that one, then the random init.
    assert rows["teacher"]["perplexity"] < rows["distill"]["perplexity"] < 0.9 * rows["ce-only"]["perplexity"]
    assert rows["ce-only"]["perplexity"] < rows["student"]["perplexity"]
    # Speed and memory for every variant, and the engine that timed it; the task table beside.
    for name, row in rows.items():
        assert row["memoryBytes"] > 0 and row["batch"] == 8 and row["batchTokensPerSecond"] > 0, row
        assert row["engine"] == ("llama.cpp (cpu)" if name == "gguf" else "transformers (cpu)"), row
        assert [t["task"] for t in row["tasks"]] == ["docstring-next-word", "docstring-phrase"], row
    assert "decode/s b1" in r.stdout and "docstring-next-word" in r.stdout
    for variant in ("nf4", "gptq", "gguf"):  # the gate held: within 5% of the distilled student
        assert rows[variant]["perplexity"] <= rows["distill"]["perplexity"] * 1.05
    print(f"demo: {elapsed:.0f}s; perplexity distill {rows['distill']['perplexity']:.1f}, "
          f"ce-only {rows['ce-only']['perplexity']:.1f}, teacher {rows['teacher']['perplexity']:.1f}")


def test_rerun_skips_every_stage(demo_run):
    work, _, _ = demo_run
    r = kondense("demo", "--base", str(work / "base"), cwd=work)
    assert r.returncode == 0 and "Stages run: none (all up to date)" in r.stdout, r.stdout
    assert re.search(r"^  distill\s+distill/logits\s+Succeeded\s+up to date$", r.stdout, re.M), r.stdout
    assert "\ndistill *" in r.stdout  # the table again, from the stored report


def test_report_prints_the_table_again(demo_run):
    work, _, _ = demo_run
    pipeline = work / "pipeline.yaml"
    from kondense import demo

    pipeline.write_text(demo.template().replace(demo.PLACEHOLDER, to_uri(str(work / "base"))))
    r = kondense("report", str(pipeline), cwd=work)
    assert r.returncode == 0 and "perplexity" in r.stdout and "\ngguf " in r.stdout, r.stderr


def test_demo_on_s3(demo_run, s3_bucket, tmp_path):
    """The same pipeline against a local S3 server: inputs uploaded, artifacts committed there."""
    r = kondense("demo", "--base", f"{s3_bucket}/demo", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    status = json.loads((tmp_path / ".kondense/default/demo/status.json").read_text())["status"]
    store = S3Store()
    for stage in status["stages"]:
        assert stage["artifact"]["uri"].startswith(f"{s3_bucket}/demo/artifacts/default/demo/")
        assert store.read_manifest(stage["artifact"]["uri"]).digest == stage["artifact"]["digest"]


def small_pipeline(tmp_path: Path, steps: int) -> Path:
    from kondense import demo

    inputs = demo.build_inputs(demo.inputs_cache())
    base = to_uri(str(tmp_path / "base"))
    demo.stage_inputs(inputs, base)
    doc = yaml.safe_load(demo.template().replace(demo.PLACEHOLDER, base))
    doc["metadata"]["name"] = "resume"
    doc["spec"]["stages"] = [
        {"name": "distill", "distill": {"method": "logits", "maxSteps": steps, "batchSize": 8, "maxSeqLength": 128,
                                        "learningRate": 1e-3, "checkpointEvery": 5}},
        {"name": "gguf", "quantize": {"method": "gguf", "type": "q8_0"}},
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_ctrl_c_stops_cleanly_and_the_next_run_resumes_from_the_checkpoint(tmp_path):
    path = small_pipeline(tmp_path, steps=60)
    # As a terminal runs it: SIGINT at its default even when pytest inherited it ignored (a job started
    # with `&` by a shell without job control ignores SIGINT, and so would every process it starts).
    proc = subprocess.Popen([sys.executable, "-m", "kondense.cli", "run", str(path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoints = tmp_path / "base/artifacts/default/resume"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("distill-*.checkpoints/step-*/manifest.json")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "Interrupted. Run the same command again to resume." in out
    status = json.loads((tmp_path / ".kondense/default/resume/status.json").read_text())["status"]
    assert status["stages"][0]["reason"] == "Interrupted"

    r = kondense("run", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:]
    status = json.loads((tmp_path / ".kondense/default/resume/status.json").read_text())["status"]
    metrics = status["stages"][0]["metrics"]
    assert metrics["resumedFromStep"] >= 5 and metrics["steps"] == 60, metrics


def test_a_failed_quantize_stage_leaves_a_report_of_the_other_variants(tmp_path):
    """evaluate.onMissingVariant: skip: the stage that fails is in the report with its reason,
    the others are measured; a second run retries the failed stage and keeps the report."""
    from kondense import demo

    inputs = demo.build_inputs(demo.inputs_cache())
    base = to_uri(str(tmp_path / "base"))
    demo.stage_inputs(inputs, base)
    doc = yaml.safe_load(demo.template().replace(demo.PLACEHOLDER, base))
    doc["metadata"]["name"] = "partial"
    doc["spec"]["stages"] = [
        # Fails at once (InvalidSpec: the pattern matches no module of the model).
        {"name": "broken", "quantize": {"method": "gptq", "ignore": ["no_such_module"], "calibrationSamples": 8}},
        {"name": "eval", "evaluate": {"of": ["student", "teacher", "broken"], "onMissingVariant": "skip",
                                      "seqLength": 64, "maxEvalTokens": 1024, "generateTokens": 4,
                                      "gates": {"maxKLDivergence": 100.0}}},
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = kondense("run", str(path), cwd=tmp_path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # the pipeline failed: one stage did
    status = json.loads((tmp_path / ".kondense/default/partial/status.json").read_text())["status"]
    states = {s["name"]: (s["state"], s.get("reason")) for s in status["stages"]}
    assert states == {"broken": ("Failed", "InvalidSpec"), "eval": ("Succeeded", "Succeeded")}, states
    rows = {row["variant"]: row for row in status["report"]["table"]}
    assert list(rows) == ["student", "teacher", "broken"]
    assert rows["broken"]["missing"].startswith("stage broken failed: InvalidSpec: quantize.ignore[0]: 'no_such_module'")
    assert rows["student"]["klDivergence"] == 0 and rows["teacher"]["klDivergence"] > 0
    assert 0 <= rows["teacher"]["top1Agreement"] < 1  # the random student and the teacher barely agree
    assert "n/a: broken: not evaluated: stage broken failed: InvalidSpec" in r.stdout
    report_dir = FileStore.path(status["report"]["uri"])
    assert "| broken | not evaluated |" in (report_dir / "report.md").read_text()

    # Again: the failed stage is retried (and fails again), the report without it is up to date.
    again = kondense("run", str(path), cwd=tmp_path)
    assert again.returncode == 1 and "Stages run: broken in" in again.stdout, again.stdout[-3000:]
    printed = kondense("report", str(path), cwd=tmp_path)
    assert printed.returncode == 0 and "n/a: broken: not evaluated: stage broken failed" in printed.stdout, printed.stderr
