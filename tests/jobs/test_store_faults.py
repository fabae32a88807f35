"""A real stage against a store that goes down, and against a corrupt artifact (issue 13, items 4 and 5).

The stage is quantize bnb-int8 of the tiny student: the cheapest stage that downloads an artifact
(the student, published as an earlier stage's output) and publishes one. It talks to the local S3
server through tests/faults.py's proxy, which goes down at a chosen request of the transfer.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from faults import Match
from faults import request as http_request

from kondense.api import CompressionPipeline, InputRef, QuantizeSpec, Storage
from kondense.errors import InvalidInput
from kondense.launch import stage_command
from kondense.local import LocalRunner
from kondense.store import MANIFEST, FileStore, S3Store, join, to_uri

pytestmark = [pytest.mark.slow, pytest.mark.s3]

OUTAGE = 30  # seconds: longer than botocore's own retries (at most 1 + 2 + 4 s of waits), so the store's must act
UPSTREAM_DIGEST = "sha256:student-upstream"
WEIGHTS = "model.safetensors"


def is_upload(run) -> Match:
    """A PUT of one of the stage's output files, not its manifest: the upload is under way."""
    return http_request("PUT", f"^/{bucket_of(run.output)}/{key_of(run.output)}/", exclude=rf"/{MANIFEST}$")


def bucket_of(uri: str) -> str:
    return uri.removeprefix("s3://").split("/", 1)[0]


def key_of(uri: str) -> str:
    return uri.removeprefix("s3://").split("/", 1)[1]


@pytest.fixture
def upstream(s3_bucket, tiny_student) -> InputRef:
    """The tiny student, committed in S3 as an earlier stage's artifact (straight to the server, no proxy)."""
    uri = f"{s3_bucket}/artifacts/student-upstream"
    S3Store().publish(tiny_student, uri, stage="student", stage_kind="distill", input_digest=UPSTREAM_DIGEST)
    return InputRef(uri=uri, stage="student", input_digest=UPSTREAM_DIGEST)


def quantize_run(make_run, tmp_path: Path, upstream: InputRef, endpoint: str):
    bucket = "s3://" + bucket_of(upstream.uri)
    return make_run(
        tmp_path, "quantize", QuantizeSpec(method="bnb-int8"), {"model": upstream}, stage="int8",
        output=f"{bucket}/artifacts/int8", storage=Storage(uri=bucket, endpoint=endpoint),
    )


def assert_committed(run, tmp_path: Path, summary) -> None:
    """The output is a complete artifact: every file there and matching manifest.json's sha256."""
    fetched = S3Store().fetch(run.output, tmp_path / "check", expect_input_digest=run.input_digest)  # verifies
    assert summary.artifact.digest == fetched.digest and WEIGHTS in fetched.files, fetched.files


def test_store_down_during_the_upload(tmp_path, make_run, run_stage, upstream, s3_faults):
    run, spec = quantize_run(make_run, tmp_path, upstream, s3_faults.url)
    outage = s3_faults.down_at(is_upload(run), OUTAGE)
    code, summary, output = run_stage("quantize", spec, tmp_path)
    assert code == 0, output[-3000:]
    assert outage.tripped.is_set(), f"the stage never uploaded through the proxy: {s3_faults.requests}"
    down, up = s3_faults.outages[0]
    assert up - down >= OUTAGE
    assert "Store upload failed (attempt 1)" in output, output[-3000:]  # the store's retries did it, not luck
    cut = next(i for i, (m, p) in enumerate(s3_faults.requests) if outage.match(m, p))
    manifest_put = s3_faults.requests.index(("PUT", f"/{bucket_of(run.output)}/{key_of(run.output)}/{MANIFEST}"))
    assert manifest_put > cut  # committed after the outage, once every file was up
    assert_committed(run, tmp_path, summary)


def test_store_down_during_the_download(tmp_path, make_run, run_stage, upstream, s3_faults):
    run, spec = quantize_run(make_run, tmp_path, upstream, s3_faults.url)
    weights = http_request("GET", f"/{key_of(upstream.uri)}/{WEIGHTS}$")
    outage = s3_faults.down_at(weights, OUTAGE, after_response_bytes=64 * 1024)  # mid-body
    code, summary, output = run_stage("quantize", spec, tmp_path)
    assert code == 0, output[-3000:]
    assert outage.tripped.is_set(), f"the stage never downloaded through the proxy: {s3_faults.requests}"
    down, up = s3_faults.outages[0]
    assert up - down >= OUTAGE
    assert "Store download failed (attempt 1)" in output, output[-3000:]
    assert s3_faults.count(weights) >= 2  # fetched again after the outage
    assert_committed(run, tmp_path, summary)


def test_stage_killed_mid_upload_leaves_no_artifact(tmp_path, make_run, run_stage, upstream, s3_faults):
    run, spec = quantize_run(make_run, tmp_path, upstream, s3_faults.url)
    outage = s3_faults.down_at(is_upload(run), None)  # down until we bring it back
    stage_args = ["--spec", str(spec), "--termination-log", str(tmp_path / "t1"), "--cache-dir", str(tmp_path / "cache")]
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            stage_command("quantize", stage_args, run.resources, python=sys.executable),
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        try:
            deadline = time.monotonic() + 300
            while not outage.tripped.wait(0.1):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the stage did not start its upload in 300 s"
        finally:  # as a lost node would: SIGKILL, no chance to clean up
            root = psutil.Process(proc.pid)
            for p in [*root.children(recursive=True), root]:
                p.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    s3_faults.up()

    store = S3Store()
    assert store.read_manifest(run.output) is None
    with pytest.raises(InvalidInput, match=r"manifest\.json is missing: the artifact was never committed"):
        store.fetch(run.output, tmp_path / "downstream")  # what a downstream stage does first
    assert not (tmp_path / "downstream").exists() or not any((tmp_path / "downstream").iterdir())

    code, summary, output = run_stage("quantize", spec, tmp_path)  # the retry publishes it whole
    assert code == 0, output[-3000:]
    assert summary.reason == "Succeeded", summary  # really ran again: the partial files were no artifact
    assert_committed(run, tmp_path, summary)


# -- corruption: one byte flipped in a published artifact -------------------------------------


def flip_first_byte(data: bytes) -> bytes:
    return bytes([data[0] ^ 0x01]) + data[1:]


@pytest.mark.parametrize("scheme", ["s3", "file"])
def test_corrupt_input_fails_with_both_digests_and_publishes_nothing(scheme, tmp_path, make_run, run_stage, tiny_student, request):
    """The next stage that reads the artifact fails InvalidInput naming the file and both sha256."""
    source = shutil.copytree(tiny_student, tmp_path / "student")  # a file:// publish hard-links: never touch the fixture
    if scheme == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        store, base, storage = S3Store(), bucket + "/artifacts", Storage(uri=bucket)
    else:
        store, base = FileStore(), to_uri(str(tmp_path / "store"))
        storage = Storage(uri=base)
    up_uri = join(base, "student-upstream")
    manifest = store.publish(source, up_uri, stage="student", stage_kind="distill", input_digest=UPSTREAM_DIGEST)
    good = store.read_bytes(join(up_uri, WEIGHTS))
    if scheme == "s3":
        store.write_bytes(join(up_uri, WEIGHTS), flip_first_byte(good))
    else:  # in place, as bit rot on a volume would
        with open(FileStore.path(join(up_uri, WEIGHTS)), "r+b") as f:
            f.write(flip_first_byte(good)[:1])
    actual = hashlib.sha256(flip_first_byte(good)).hexdigest()
    expected = manifest.files[WEIGHTS].sha256
    assert expected == hashlib.sha256(good).hexdigest() != actual

    ref = InputRef(uri=up_uri, stage="student", input_digest=UPSTREAM_DIGEST)
    run, spec = make_run(tmp_path, "quantize", QuantizeSpec(method="bnb-int8"), {"model": ref}, stage="int8",
                         output=join(base, "int8"), storage=storage)
    code, summary, output = run_stage("quantize", spec, tmp_path)
    assert code == 11 and summary.reason == "InvalidInput", output[-3000:]
    assert f"{up_uri}/{WEIGHTS} has sha256 {actual}, manifest.json says {expected}" in summary.message, summary.message
    assert store.read_manifest(run.output) is None  # nothing published, not even partial files
    if scheme == "s3":
        assert store.list_keys(run.output) == []
    else:
        assert not FileStore.path(run.output).exists()


def test_local_runner_runs_nothing_on_a_corrupt_artifact(tmp_path, tiny_student, tiny_dataset):
    """`kondense run` skips a committed stage by its manifest; the stage after it must refuse the corrupt files."""
    source = shutil.copytree(tiny_student, tmp_path / "student")
    base = to_uri(str(tmp_path / "store"))
    pipeline = CompressionPipeline.model_validate({
        "apiVersion": "kondense.io/v1alpha1", "kind": "CompressionPipeline", "metadata": {"name": "corrupt"},
        "spec": {
            "teacher": {"uri": to_uri(str(source))}, "student": {"uri": to_uri(str(source))},
            "dataset": {"uri": to_uri(str(tiny_dataset))}, "storage": {"uri": base}, "resources": {"gpus": 0},
            "stages": [
                {"name": "int8", "quantize": {"method": "bnb-int8"}},
                {"name": "eval", "evaluate": {"of": ["int8"], "seqLength": 32, "maxEvalTokens": 256, "generateTokens": 4}},
            ],
        },
    })
    runner = LocalRunner(pipeline, tmp_path / "state", out=io.StringIO(), cache_dir=tmp_path / "cache")
    int8, ev = runner.by_name["int8"], runner.by_name["eval"]
    # int8 committed earlier (its files: a model folder), then one byte of its weights rots on disk.
    committed = shutil.copytree(source, tmp_path / "int8-output")
    manifest = FileStore().publish(committed, int8.output, stage="int8", stage_kind="quantize", input_digest=int8.input_digest)
    weights = FileStore.path(join(int8.output, WEIGHTS))
    with open(weights, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0x01]))
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()

    status = runner.run()

    stages = {s.name: s for s in status.stages}
    assert runner.executed == ["eval"]  # int8 counted as committed (its manifest matches); eval started
    assert stages["int8"].reason == "UpToDate"
    assert (stages["eval"].state, stages["eval"].reason) == ("Failed", "InvalidInput"), stages["eval"]
    assert stages["eval"].attempts == 1  # permanent: not retried
    assert f"{int8.output}/{WEIGHTS} has sha256 {actual}, manifest.json says {manifest.files[WEIGHTS].sha256}" in stages["eval"].message
    assert not FileStore.path(ev.output).exists(), "the downstream stage produced an output from a corrupt input"
