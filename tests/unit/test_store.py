"""The artifact store on file:// and on a real S3 protocol server (moto)."""

from __future__ import annotations

import os

import pytest

from kondense.errors import InvalidInput, InvalidSpec, StorageAccessDenied, StorageUnavailable
from kondense.store import MANIFEST, FileStore, S3Store, artifact_uri, open_store, to_uri


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
    with pytest.raises(InvalidInput, match=r"w\.bin has sha256 .* the file is corrupt"):
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
