"""`python -m kondense_jobs.cleanup`: what the cleanup Job runs for deletionPolicy: Delete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kondense.events import parse_summary
from kondense.store import S3Store, join


def cleanup(*args: str, tmp_path: Path) -> tuple[int, dict]:
    """Run it as the Job does; (exit code, the summary in its termination message)."""
    term = tmp_path / "termination-log"
    proc = subprocess.run([sys.executable, "-m", "kondense_jobs.cleanup", *args, "--termination-log", str(term)],
                          capture_output=True, text=True, timeout=120)
    summary = parse_summary(term.read_text())
    assert summary is not None, proc.stderr
    return proc.returncode, summary.model_dump()


def test_deletes_one_pipeline_and_nothing_beside_it(tmp_path):
    runs = tmp_path / "runs"
    for rel in ("ml/p1/distill-abc/model.safetensors", "ml/p1/distill-abc/manifest.json", "ml/p1/gguf-def/m.gguf",
                "ml/p10/distill-abc/manifest.json", "other/p1/eval-1/report.json"):
        (runs / rel).parent.mkdir(parents=True, exist_ok=True)
        (runs / rel).write_text("x")
    code, summary = cleanup("--prefix", f"file://{runs}/ml/p1", tmp_path=tmp_path)
    assert code == 0 and summary["state"] == "Succeeded" and summary["metrics"]["deleted_objects"] == 3
    assert not (runs / "ml/p1").exists()
    assert (runs / "ml/p10/distill-abc/manifest.json").exists() and (runs / "other/p1/eval-1/report.json").exists()
    code, summary = cleanup("--prefix", f"file://{runs}/ml/p1", tmp_path=tmp_path)  # a retried Job
    assert code == 0 and summary["metrics"]["deleted_objects"] == 0


@pytest.mark.parametrize("prefix", ["s3://bucket", "s3://bucket/runs", "file:///", "file:///srv", "gs://bucket/a/b"])
def test_refuses_prefixes_that_could_reach_beyond_one_pipeline(tmp_path, prefix):
    code, summary = cleanup("--prefix", prefix, tmp_path=tmp_path)
    assert code == 10 and summary["reason"] == "InvalidSpec" and prefix in summary["message"]


@pytest.mark.s3
def test_deletes_from_s3_past_one_delete_objects_page(tmp_path, s3_bucket, s3_endpoint):
    store = S3Store(endpoint=s3_endpoint)
    src = tmp_path / "f"
    src.write_text("x")
    keep = join(s3_bucket, "runs/ml/p2/distill-1/manifest.json")
    store.upload([(src, join(s3_bucket, f"runs/ml/p1/distill-1/shard-{i:04d}")) for i in range(1005)] + [(src, keep)])
    code, summary = cleanup("--prefix", join(s3_bucket, "runs/ml/p1"), "--endpoint", s3_endpoint, tmp_path=tmp_path)
    assert code == 0 and summary["metrics"]["deleted_objects"] == 1005
    assert store.list_keys(join(s3_bucket, "runs/ml/p1")) == [] and store.read_bytes(keep) == b"x"
