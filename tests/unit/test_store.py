"""The artifact store on file:// and on a real S3 protocol server (moto)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from faults import request, s3_error

from kondense.errors import InvalidInput, InvalidSpec, StorageAccessDenied, StorageUnavailable
from kondense.store import (
    MANIFEST,
    OUTAGE_WINDOW,
    STAGE_ATTEMPTS,
    Backoff,
    FileStore,
    S3Store,
    StoreOutage,
    artifact_uri,
    open_store,
    to_uri,
)


def make_folder(root, files: dict[str, bytes]):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


FILES = {"config.json": b"{}", "model.safetensors": os.urandom(3 * 1024 * 1024 + 17), "sub/tok.json": b"x"}


@pytest.fixture(params=["file", "s3"])
def store_and_base(request, tmp_path):
    if request.param == "file":
        return FileStore(), to_uri(str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(), bucket + "/prefix"


def test_publish_then_fetch_roundtrip_verifies_digests(store_and_base, tmp_path):
    store, base = store_and_base
    src = make_folder(tmp_path / "src", FILES)
    uri = base + "/ns/p/stage-abc"
    m = store.publish(src, uri, stage="stage", stage_kind="distill", input_digest="sha256:abc", metrics={"loss": 1.5})
    assert m.size_bytes == sum(len(v) for v in FILES.values()) and set(m.files) == set(FILES)
    again = store.read_manifest(uri)
    assert again.digest == m.digest and again.metrics == {"loss": 1.5}
    got = store.fetch(uri, tmp_path / "dst", expect_input_digest="sha256:abc")
    assert got.digest == m.digest
    for rel, data in FILES.items():
        assert (tmp_path / "dst" / rel).read_bytes() == data


def test_fetch_refuses_missing_manifest_and_wrong_digest(store_and_base, tmp_path):
    store, base = store_and_base
    src = make_folder(tmp_path / "src", {"a.bin": b"1"})
    store.upload([(src / "a.bin", base + "/half/a.bin")])  # uploaded but never committed
    with pytest.raises(InvalidInput, match="manifest.json is missing"):
        store.fetch(base + "/half", tmp_path / "x")
    store.publish(src, base + "/full", stage="s", stage_kind="quantize", input_digest="sha256:1")
    with pytest.raises(InvalidInput, match="expected sha256:2"):
        store.fetch(base + "/full", tmp_path / "y", expect_input_digest="sha256:2")


def test_corrupt_file_is_named(tmp_path):
    store = FileStore()
    src = make_folder(tmp_path / "src", {"w.bin": b"good"})
    uri = to_uri(str(tmp_path / "store/a"))
    store.publish(src, uri, stage="s", stage_kind="distill", input_digest="sha256:1")
    (tmp_path / "store/a/w.bin").write_bytes(b"evil")
    good, evil = hashlib.sha256(b"good").hexdigest(), hashlib.sha256(b"evil").hexdigest()
    with pytest.raises(InvalidInput, match=rf"{uri}/w\.bin has sha256 {evil}, manifest.json says {good}: the file is corrupt"):
        store.fetch(uri, tmp_path / "dst")


def test_manifest_is_written_last(tmp_path, monkeypatch):
    """An upload interrupted before the manifest leaves no artifact behind."""
    store = FileStore()
    src = make_folder(tmp_path / "src", {"a": b"1", "b": b"2"})
    uri = to_uri(str(tmp_path / "store/x"))

    def boom(files):
        raise StorageUnavailable("network down")

    monkeypatch.setattr(store, "upload", boom)
    with pytest.raises(StorageUnavailable):
        store.publish(src, uri, stage="s", stage_kind="distill", input_digest="sha256:1")
    assert store.read_manifest(uri) is None and not (tmp_path / "store/x" / MANIFEST).exists()


def test_s3_errors_are_classified(s3_endpoint, s3_bucket, monkeypatch):
    with pytest.raises(InvalidSpec, match="bucket does not exist"):
        S3Store().write_bytes("s3://no-such-bucket-here/x", b"1")
    with pytest.raises(StorageUnavailable, match="cannot reach"):
        S3Store(endpoint="http://127.0.0.1:9", max_attempts=1).read_bytes(s3_bucket + "/x")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageAccessDenied, match="no S3 credentials"):
        S3Store().read_bytes(s3_bucket + "/x")


def test_file_store_check_access_fails_clearly(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageAccessDenied, match="cannot write to file://"):
        FileStore().check_access(to_uri(str(blocker / "sub")))


def test_uris():
    assert artifact_uri("s3://b/p/", "ns", "pipe", "nf4", "sha256:0123456789abcdef") == "s3://b/p/ns/pipe/nf4-0123456789ab"
    assert to_uri("/tmp/x/") == "file:///tmp/x"
    assert isinstance(open_store("file:///x"), FileStore)
    with pytest.raises(InvalidSpec, match="storage must be"):
        open_store("gs://b/x")


# -- outages: the application-level retry around the S3 primitives --------------------------


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self):
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def failing(error: Exception, times: int):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "ok"

    return fn, calls


def test_backoff_waits_grow_to_the_cap_and_rides_out_an_outage(caplog):
    t = FakeTime()
    backoff = Backoff(window=300, first=1, cap=30, sleep=t.sleep, clock=t.clock)
    fn, calls = failing(StoreOutage("s3://b/k: cannot reach the S3 endpoint."), times=8)
    with caplog.at_level("WARNING", logger="kondense.store"):
        assert backoff.call("upload", fn) == "ok"
    assert len(calls) == 9 and len(t.slept) == 8
    for n, wait in enumerate(t.slept, 1):  # jittered down by at most half of min(cap, 2**(n-1))
        full = min(30, 2 ** (n - 1))
        assert full / 2 <= wait <= full, (n, wait)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 8  # one line per retry: what, the attempt, the error and the wait
    assert lines[0].startswith("Store upload failed (attempt 1): s3://b/k: cannot reach") and "Retrying in" in lines[0]
    assert "(attempt 8)" in lines[-1]


def test_backoff_gives_up_after_the_window():
    t = FakeTime()
    backoff = Backoff(window=60, first=1, cap=30, sleep=t.sleep, clock=t.clock)
    fn, calls = failing(StoreOutage("s3://b/k: 503 from S3."), times=10**6)
    with pytest.raises(StoreOutage, match=r"503 from S3\. Gave up after \d+ attempts in \d+ s \(outage window 60 s\)"):
        backoff.call("read", fn)
    assert sum(t.slept) <= 60 and t.now - 1000 <= 60
    assert sum(t.slept) > 60 - 30  # it did not stop early: the next wait (at most the cap) would pass the window
    assert len(calls) == len(t.slept) + 1


@pytest.mark.parametrize(
    "error",
    [
        StorageAccessDenied("s3://b/k: access denied (AccessDenied)."),
        InvalidSpec("s3://b/k: the bucket does not exist."),
        InvalidInput("s3://b/k: not found."),
        StorageUnavailable("s3://b/k: InvalidArgument from S3."),  # a 4xx that waiting does not heal
    ],
    ids=["access-denied", "no-such-bucket", "not-found", "other-4xx"],
)
def test_backoff_does_not_retry_what_waiting_cannot_fix(error):
    t = FakeTime()
    fn, calls = failing(error, times=1)
    with pytest.raises(type(error)) as raised:
        Backoff(window=300, sleep=t.sleep, clock=t.clock).call("read", fn)
    assert type(raised.value) is type(error) and len(calls) == 1 and t.slept == []


def test_backoff_window_zero_fails_fast_with_the_original_error():
    t = FakeTime()
    error = StoreOutage("s3://b/k: cannot reach the S3 endpoint.")
    fn, calls = failing(error, times=1)
    with pytest.raises(StoreOutage) as raised:
        Backoff(window=0, sleep=t.sleep, clock=t.clock).call("read", fn)
    assert raised.value is error and len(calls) == 1 and t.slept == []


@pytest.mark.parametrize(
    "max_attempts, outage_window, expected",
    [(STAGE_ATTEMPTS, None, OUTAGE_WINDOW), (2, None, 0.0), (1, None, 0.0), (2, 45.0, 45.0), (STAGE_ATTEMPTS, 0.0, 0.0)],
    ids=["stage-default", "fail-fast-2", "fail-fast-1", "explicit-window", "explicit-none"],
)
def test_who_gets_an_outage_window(max_attempts, outage_window, expected):
    store = open_store("s3://b/p", "http://127.0.0.1:9", "us-east-1", max_attempts=max_attempts, outage_window=outage_window)
    assert store.backoff.window == expected


def test_s3_store_rides_out_a_short_outage(s3_faults, s3_bucket, caplog):
    """Down for 2 s at the first GET, botocore not retrying at all: the store's own retries carry on."""
    S3Store().write_bytes(s3_bucket + "/k", b"data")
    outage = s3_faults.down_at(request("GET", "/k$"), 2)
    store = S3Store(endpoint=s3_faults.url, max_attempts=0, outage_window=60)
    with caplog.at_level("WARNING", logger="kondense.store"):
        assert store.read_bytes(s3_bucket + "/k") == b"data"
    assert outage.tripped.is_set() and s3_faults.count(request("GET", "/k$")) >= 2
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Store read failed")]
    assert retries and f"{s3_bucket}/k" in retries[0] and "testing" not in " ".join(retries)  # no credential


def test_s3_store_retries_5xx_but_not_access_denied(s3_faults, s3_bucket, caplog, tmp_path):
    S3Store().write_bytes(s3_bucket + "/k", b"data")
    store = S3Store(endpoint=s3_faults.url, max_attempts=1, outage_window=60)  # botocore: 2 tries
    s3_faults.answer(request("GET", "/k$"), 503, s3_error("ServiceUnavailable"), times=2)
    with caplog.at_level("WARNING", logger="kondense.store"):
        assert store.read_bytes(s3_bucket + "/k") == b"data"  # botocore's 2 tries, then the store's retry
    assert s3_faults.count(request("GET", "/k$")) == 3
    assert any("ServiceUnavailable" in r.getMessage() for r in caplog.records)

    s3_faults.answer(request("GET", "/denied$"), 403, s3_error("AccessDenied", "nope"), times=100)
    with pytest.raises(StorageAccessDenied, match="access denied"):
        store.read_bytes(s3_bucket + "/denied")
    assert s3_faults.count(request("GET", "/denied$")) == 1  # neither botocore nor the store asked again

    with pytest.raises(InvalidSpec, match="bucket does not exist"):
        store.write_bytes("s3://no-such-bucket-here/x", b"1")
    assert s3_faults.count(request("PUT", "^/no-such-bucket-here/")) == 1
    with pytest.raises(InvalidInput, match="not found"):
        store.download([(s3_bucket + "/missing", tmp_path / "never-written")])
    assert s3_faults.count(request("HEAD", "/missing$")) == 1


def test_s3_store_gives_up_after_its_window_and_fail_fast_callers_at_once(s3_faults, s3_bucket):
    s3_faults.down(None)  # down until the end of the test
    started = time.monotonic()
    with pytest.raises(StoreOutage, match=r"cannot reach the S3 endpoint.*Gave up after \d+ attempts .*outage window 3 s"):
        S3Store(endpoint=s3_faults.url, max_attempts=0, outage_window=3).read_bytes(s3_bucket + "/k")
    assert 1.5 <= time.monotonic() - started < 3 + 2
    started = time.monotonic()
    with pytest.raises(StoreOutage, match="cannot reach the S3 endpoint") as raised:
        open_store(s3_bucket, s3_faults.url, max_attempts=2).read_bytes(s3_bucket + "/k")
    assert "Gave up" not in str(raised.value) and time.monotonic() - started < 8  # botocore's 3 tries only
