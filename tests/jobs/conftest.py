"""Fixtures for stage tests: tiny models and datasets built on the spot, and a stage runner.

Models are built once per session under pytest's base temp dir (a few seconds in all).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kondense.api import DatasetRef, InputRef, Resources, StageRun, Storage, Summary
from kondense.events import parse_summary
from kondense.launch import stage_command

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    from kondense_jobs.tiny import corpus

    return corpus(max_docs=1500)


@pytest.fixture(scope="session")
def tiny_tokenizer(corpus_texts):
    from kondense_jobs.tiny import train_tokenizer

    return train_tokenizer(corpus_texts, vocab_size=1024)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(models_root, tiny_tokenizer) -> Path:
    out = models_root / "tokenizer"
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(models_root, corpus_texts) -> Path:
    from kondense_jobs.tiny import write_jsonl

    return write_jsonl(models_root / "dataset.jsonl", [{"text": t} for t in corpus_texts[:400]])


@pytest.fixture(scope="session")
def tiny_teacher(models_root, tiny_tokenizer, corpus_texts) -> Path:
    from kondense_jobs.tiny import build_model, pretrain

    out = build_model(models_root / "teacher", tiny_tokenizer, family="llama", layers=4, hidden=128, heads=4, seed=1)
    pretrain(out, corpus_texts[:1200], steps=150, seq_len=64, batch=16, lr=3e-3)
    return out


def _student(models_root, tokenizer, family: str) -> Path:
    from kondense_jobs.tiny import build_model

    return build_model(models_root / f"student-{family}", tokenizer, family=family, layers=2, hidden=64, heads=4, seed=2)


@pytest.fixture(scope="session")
def tiny_student(models_root, tiny_tokenizer) -> Path:
    return _student(models_root, tiny_tokenizer, "llama")


@pytest.fixture(scope="session")
def tiny_student_qwen2(models_root, tiny_tokenizer) -> Path:
    return _student(models_root, tiny_tokenizer, "qwen2")


@pytest.fixture(scope="session")
def tiny_student_gpt2(models_root, tiny_tokenizer) -> Path:
    return _student(models_root, tiny_tokenizer, "gpt2")


def _make_run(
    tmp_path: Path,
    kind: str,
    config,
    models: dict[str, Path | InputRef],
    dataset: Path | None = None,
    **overrides,
) -> tuple[StageRun, Path]:
    """A StageRun with file:// storage under tmp_path, written to tmp_path/<stage>.json."""
    stage = overrides.pop("stage", kind)
    refs = {role: m if isinstance(m, InputRef) else InputRef(uri=f"file://{m}") for role, m in models.items()}
    run = StageRun(
        pipeline=overrides.pop("pipeline", "test"),
        namespace=overrides.pop("namespace", "default"),
        stage=stage,
        stage_kind=kind,
        **{kind: config},
        models=refs,
        dataset=overrides.pop("dataset_ref", None) or DatasetRef(uri=f"file://{dataset}" if dataset else "file:///nonexistent.jsonl", eval_split=0.1),
        output=overrides.pop("output", f"file://{tmp_path}/store/{stage}"),
        input_digest=overrides.pop("input_digest", f"sha256:{stage}-test"),
        storage=overrides.pop("storage", Storage(uri=f"file://{tmp_path}/store")),
        resources=overrides.pop("resources", Resources(gpus=0)),
        **overrides,
    )
    path = tmp_path / f"{stage}.json"
    path.write_text(json.dumps(run.dump()))
    return run, path


def _run_stage(kind: str, spec: Path, tmp_path: Path, env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, Summary | None, str]:
    """Run the stage's command as the operator and the local runner do; return (exit, summary, output)."""
    term = tmp_path / f"termination-{spec.stem}.log"
    # only the resources and the strategy: a test may hand the stage a deliberately invalid document
    doc = json.loads(spec.read_text())
    resources = Resources.model_validate(doc.get("resources", {}))
    sharded = (doc.get("distill") or {}).get("strategy") == "fsdp"
    stage_args = ["--spec", str(spec), "--termination-log", str(term), "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(
        stage_command(kind, stage_args, resources, python=sys.executable, sharded=sharded),  # the launcher when workers > 1
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        cwd=ROOT,
    )
    summary = parse_summary(term.read_text()) if term.exists() else None
    return proc.returncode, summary, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def argmax_steps():
    """argmax_steps(model_dir, rows, n) -> each row's n next tokens by plain argmax steps, row by row and
    without a cache: what any greedy generation of the model must give (generate() would mask EOS)."""

    def steps(model_dir: Path, rows, n: int) -> list[list[int]]:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        out = []
        with torch.no_grad():
            for row in rows:
                ids = [int(t) for t in row]
                for _ in range(n):
                    ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
                out.append(ids[len(row):])
        return out

    return steps


TEACHER_QUANTIZED = {"nf4": {"method": "bnb-nf4"}, "q8_0": {"method": "gguf", "type": "q8_0"}, "f32": {"method": "gguf", "type": "f32"}}


@pytest.fixture(scope="session")
def teacher_quantized(tmp_path_factory, tiny_teacher, tiny_dataset):
    """teacher_quantized(name) -> InputRef: the tiny teacher through the real quantize stage, as the
    artifact evaluate receives; each of TEACHER_QUANTIZED made once per session, for every test that
    evaluates it."""
    from kondense.api import QuantizeSpec

    made: dict[str, InputRef] = {}

    def get(name: str) -> InputRef:
        if name not in made:
            if TEACHER_QUANTIZED[name]["method"] == "gguf" and not _has("llama_cpp", "kondense_jobs.gguf"):
                pytest.skip("llama-cpp-python or kondense_jobs.gguf not installed")
            tmp = tmp_path_factory.mktemp(f"teacher-{name}")
            config = QuantizeSpec.model_validate(TEACHER_QUANTIZED[name])
            run, spec = _make_run(tmp, "quantize", config, {"model": tiny_teacher}, dataset=tiny_dataset, stage=name)
            code, _, output = _run_stage("quantize", spec, tmp)
            assert code == 0, output[-3000:]
            made[name] = InputRef(uri=run.output, stage=name, input_digest=run.input_digest)
        return made[name]

    return get


def _has(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.fixture(scope="session")
def make_run():
    """make_run(tmp_path, kind, config, models, dataset=None, **overrides) -> (StageRun, spec_path)."""
    return _make_run


@pytest.fixture(scope="session")
def run_stage():
    """run_stage(kind, spec_path, tmp_path, env=None) -> (exit_code, Summary | None, output)."""
    return _run_stage


def _kill_at_first_checkpoint(run: StageRun, spec: Path, tmp_path: Path, work_dir: Path | None = None) -> list[int]:
    """Start the stage's command, SIGKILL it and every process it started (as a lost node would) once
    a checkpoint is committed; return the committed steps. The stage must not have published."""
    from kondense.store import FileStore

    checkpoints = FileStore.path(run.output + ".checkpoints")
    found = _kill_when_committed(run, spec, tmp_path, checkpoints, "step-*/manifest.json", work_dir)
    return sorted(int(p.parent.name[5:]) for p in found)


def _kill_when_committed(
    run: StageRun, spec: Path, tmp_path: Path, folder: Path, pattern: str, work_dir: Path | None = None
) -> list[Path]:
    """Start the stage's command, SIGKILL it and every process it started (as a lost node would) once
    `folder` holds a file matching `pattern` (a commit marker); return the matches after the kill.
    The stage must not have published."""
    import psutil

    from kondense.store import FileStore

    stage_args = ["--spec", str(spec), "--termination-log", str(tmp_path / "t1"), "--cache-dir", str(tmp_path / "cache")]
    if work_dir is not None:
        stage_args += ["--work-dir", str(work_dir)]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            stage_command(run.stage_kind, stage_args, run.resources, python=sys.executable, sharded=run.sharded),
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        try:
            deadline = time.monotonic() + 300
            while not list(folder.glob(pattern)):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"nothing committed in {folder} in 300 s"
                time.sleep(0.02)
        finally:  # torchrun starts its workers in sessions of their own: kill the tree, not a process group
            root = psutil.Process(proc.pid)
            for p in [*root.children(recursive=True), root]:
                p.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (FileStore.path(run.output) / "manifest.json").exists(), "the first run finished before the kill"
    return list(folder.glob(pattern))


@pytest.fixture(scope="session")
def kill_at_first_checkpoint():
    """kill_at_first_checkpoint(run, spec_path, tmp_path, work_dir=None) -> committed steps."""
    return _kill_at_first_checkpoint


@pytest.fixture(scope="session")
def kill_when_committed():
    """kill_when_committed(run, spec_path, tmp_path, folder, pattern, work_dir=None) -> matches after the kill."""
    return _kill_when_committed
