"""The artifact store: file:// and s3:// folders with manifest.json as the commit marker.

An artifact is a folder of files plus manifest.json, written last. A folder without a
manifest is not an artifact (an interrupted upload), so readers never see half a checkpoint.
Every file's sha256 is recorded on publish and verified on fetch.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlparse

from pydantic import Field

from kondense.api import API_VERSION, Artifact, Model
from kondense.errors import InvalidInput, InvalidSpec, StorageAccessDenied, StorageUnavailable

MANIFEST = "manifest.json"
CHUNK = 8 * 1024 * 1024

log = logging.getLogger("kondense.store")
T = TypeVar("T")

# botocore's retries per request (its Config's max_attempts counts retries: 3 is 4 tries, with
# jittered waits of at most 1, 2 and 4 s): a blip (a dropped connection, one 503) passes at once.
STAGE_ATTEMPTS = 3
# Callers that pass this many attempts or fewer must answer quickly (the local runner's access
# check, `kondense plan`): they get no outage window, the first failure is their answer.
FAIL_FAST_ATTEMPTS = 2
# How long a stage keeps retrying an operation while the store is down (restarts, failovers).
OUTAGE_WINDOW = 300.0


class FileEntry(Model):
    sha256: str
    size: int


class Manifest(Model):
    """What a committed artifact holds and how it was made."""

    api_version: str = Field(API_VERSION, alias="apiVersion")
    kind: str = "Manifest"
    stage: str
    stage_kind: str
    format: str = Field("hf", description="hf (Hugging Face folder), gguf or report")
    input_digest: str
    digest: str
    size_bytes: int
    files: dict[str, FileEntry]
    metrics: dict[str, float] = Field(default_factory=dict)
    spec: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    created_at: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)

    def artifact(self, uri: str) -> Artifact:
        return Artifact(uri=uri, digest=self.digest, size_bytes=self.size_bytes)


def to_uri(path_or_uri: str) -> str:
    """Accept a plain path where a URI is expected: /data/x -> file:///data/x."""
    if "://" in path_or_uri:
        return path_or_uri.rstrip("/")
    return "file://" + str(Path(path_or_uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def tree_digest(files: dict[str, FileEntry]) -> str:
    """One digest for a folder: sha256 over the sorted 'path sha256' lines."""
    lines = "".join(f"{p} {files[p].sha256}\n" for p in sorted(files))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def local_files(folder: Path) -> Iterator[tuple[str, Path]]:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            yield p.relative_to(folder).as_posix(), p


def hash_folder(folder: Path, workers: int = 4) -> dict[str, FileEntry]:
    entries = list(local_files(folder))
    with futures.ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL
        digests = list(pool.map(lambda e: sha256_file(e[1]), entries))
    return {rel: FileEntry(sha256=d, size=p.stat().st_size) for (rel, p), d in zip(entries, digests)}


class Store:
    """Files under URIs. Subclasses implement the five primitives; the rest is shared."""

    scheme = ""

    # -- primitives ------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes | None:
        raise NotImplementedError

    def write_bytes(self, uri: str, data: bytes) -> None:
        raise NotImplementedError

    def upload(self, files: list[tuple[Path, str]]) -> None:
        raise NotImplementedError

    def download(self, files: list[tuple[str, Path]]) -> None:
        raise NotImplementedError

    def delete_prefix(self, uri: str) -> int:
        """Delete everything under `uri`; returns how many objects there were."""
        raise NotImplementedError

    def check_access(self, uri: str) -> None:
        """Fail fast with a clear error when the store cannot be read and written."""
        raise NotImplementedError

    # -- artifacts -------------------------------------------------------------------------
    def read_manifest(self, uri: str) -> Manifest | None:
        raw = self.read_bytes(join(uri, MANIFEST))
        if raw is None:
            return None
        return Manifest.model_validate_json(raw)

    def publish(self, folder: Path, uri: str, **manifest: Any) -> Manifest:
        """Upload a folder, then write manifest.json last: the commit point. `manifest`: commit's fields."""
        return self.commit(uri, self.upload_folder(folder, uri), **manifest)

    def upload_folder(self, folder: Path, uri: str) -> dict[str, FileEntry]:
        """Upload a folder's files (no manifest); their entries for `commit`."""
        files = hash_folder(folder)
        self.upload([(folder / rel, join(uri, rel)) for rel in files])
        return files

    def commit(
        self,
        uri: str,
        files: dict[str, FileEntry],
        *,
        stage: str,
        stage_kind: str,
        input_digest: str,
        format: str = "hf",
        metrics: dict[str, float] | None = None,
        spec: dict[str, Any] | None = None,
        versions: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write manifest.json for files already uploaded under uri (by one or several workers)."""
        manifest = Manifest(
            stage=stage,
            stage_kind=stage_kind,
            format=format,
            input_digest=input_digest,
            digest=tree_digest(files),
            size_bytes=sum(f.size for f in files.values()),
            files=files,
            metrics=metrics or {},
            spec=spec or {},
            versions=versions or {},
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            extra=extra or {},
        )
        self.write_bytes(join(uri, MANIFEST), manifest.model_dump_json(by_alias=True, indent=2).encode())
        return manifest

    def fetch(self, uri: str, dest: Path, *, expect_input_digest: str | None = None) -> Manifest:
        """Download a committed artifact into dest, verifying every file's sha256."""
        manifest = self.read_manifest(uri)
        if manifest is None:
            raise InvalidInput(
                f"{join(uri, MANIFEST)} is missing: the artifact was never committed. "
                "Re-run the stage that produces it."
            )
        if expect_input_digest and manifest.input_digest != expect_input_digest:
            raise InvalidInput(
                f"{join(uri, MANIFEST)} has inputDigest {manifest.input_digest}, expected "
                f"{expect_input_digest}: the artifact belongs to another version of the stage."
            )
        dest.mkdir(parents=True, exist_ok=True)
        self.download([(join(uri, rel), dest / rel) for rel in manifest.files])
        verify(dest, manifest, uri)
        (dest / MANIFEST).write_text(manifest.model_dump_json(by_alias=True, indent=2))
        return manifest

    def local_path(self, uri: str) -> Path | None:
        """The folder itself when the store is local (no copy needed), else None."""
        return None


def verify(folder: Path, manifest: Manifest, uri: str) -> None:
    """Check every file of a manifest against its sha256; name the first that differs."""
    files = list(manifest.files.items())
    with futures.ThreadPoolExecutor(4) as pool:
        actual = list(pool.map(lambda e: sha256_file(folder / e[0]) if (folder / e[0]).is_file() else None, files))
    for (rel, entry), digest in zip(files, actual):
        if digest is None:
            raise InvalidInput(f"{join(uri, rel)} is listed in manifest.json but missing.")
        if digest != entry.sha256:
            raise InvalidInput(
                f"{join(uri, rel)} has sha256 {digest}, manifest.json says {entry.sha256}: the file is corrupt. "
                f"To resolve, delete {uri} and run the pipeline again (its stage runs again), or restore the file."
            )


class FileStore(Store):
    scheme = "file"

    @staticmethod
    def path(uri: str) -> Path:
        parsed = urlparse(uri)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise InvalidSpec(f"{uri}: expected file:///absolute/path")
        return Path(parsed.path)

    def read_bytes(self, uri: str) -> bytes | None:
        try:
            return self.path(uri).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, uri: str, data: bytes) -> None:
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: a reader never sees a partial manifest.
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, prefix=".tmp-") as tmp:
            tmp.write(data)
        os.replace(tmp.name, target)

    def upload(self, files: list[tuple[Path, str]]) -> None:
        for src, uri in files:
            dst = self.path(uri)
            if dst.exists() and os.path.samefile(src, dst):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)  # same filesystem: no copy
            except OSError:
                shutil.copyfile(src, dst)

    def download(self, files: list[tuple[str, Path]]) -> None:
        for uri, dst in files:
            src = self.path(uri)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists() and os.path.samefile(src, dst):
                continue
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)

    def delete_prefix(self, uri: str) -> int:
        root = self.path(uri)
        count = sum(1 for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
        shutil.rmtree(root, ignore_errors=True)
        return count

    def check_access(self, uri: str) -> None:
        root = self.path(uri)
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".kondense-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StorageAccessDenied(f"cannot write to {uri}: {e.strerror}") from e

    def local_path(self, uri: str) -> Path | None:
        return self.path(uri)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise InvalidSpec(f"{uri}: expected s3://bucket/prefix")
        return cls(parsed.netloc, parsed.path.lstrip("/"))


class StoreOutage(StorageUnavailable):
    """The store did not answer: refused or dropped connections, timeouts, 5xx. Retrying can help."""


@dataclass(frozen=True)
class Backoff:
    """Retries of one store operation through an outage: exponential waits within a time window.

    Wait n is first * 2**(n-1), capped at `cap`, then jittered down by up to half so that the
    workers of a stage do not come back in step. The operation is tried again while the time since
    its first failure plus the next wait stays within `window`; a window of 0 fails fast.
    Only StoreOutage is retried: access denied, a missing bucket or object never heal by waiting.
    """

    window: float = OUTAGE_WINDOW
    first: float = 1.0
    cap: float = 30.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def wait(self, attempt: int) -> float:
        full = min(self.cap, self.first * 2 ** (attempt - 1))
        return full * random.uniform(0.5, 1.0)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """fn(), tried again on StoreOutage. One log line per retry: `what` (the operation), the
        attempt, the error (it names the URI, never a credential) and the wait."""
        started = None
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except StoreOutage as e:
                if self.window <= 0:
                    raise
                now = self.clock()
                started = now if started is None else started
                wait = self.wait(attempt)
                if now - started + wait > self.window:
                    raise StoreOutage(
                        f"{e} Gave up after {attempt} attempts in {now - started:.0f} s (outage window "
                        f"{self.window:.0f} s). Check that the store is up and spec.storage.endpoint is right."
                    ) from None
                log.warning("Store %s failed (attempt %d): %s Retrying in %.1f s.", what, attempt, e, wait)
                self.sleep(wait)


class S3Store(Store):
    """S3 and S3-compatible stores through boto3.

    Credentials, region and endpoint follow boto3's standard chain (AWS_* environment, profile,
    IRSA/pod identity); the spec may set the endpoint and region. Large files go up and down in
    parallel multipart transfers, and several files move at once.

    Two layers of retries: botocore retries each request `max_attempts` times (a blip), then
    `backoff` retries the whole operation (one file, one read) through an outage of up to
    `outage_window` seconds. By default a caller asking for FAIL_FAST_ATTEMPTS or fewer gets no
    outage window.
    """

    scheme = "s3"
    PART_SIZE = 32 * 1024 * 1024
    CONCURRENCY = 16
    FILE_WORKERS = 4

    def __init__(
        self,
        endpoint: str | None = None,
        region: str | None = None,
        max_attempts: int = STAGE_ATTEMPTS,
        outage_window: float | None = None,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if outage_window is None:
            outage_window = OUTAGE_WINDOW if max_attempts > FAIL_FAST_ATTEMPTS else 0.0
        self.backoff = Backoff(window=outage_window)
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            config=Config(
                retries={"max_attempts": max_attempts, "mode": "adaptive"},
                max_pool_connections=self.CONCURRENCY * self.FILE_WORKERS,
                connect_timeout=10,
                read_timeout=120,
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=self.PART_SIZE,
            multipart_chunksize=self.PART_SIZE,
            max_concurrency=self.CONCURRENCY,
            use_threads=True,
        )

    def _call(self, what: str, uri: str, fn: Callable[[], T]) -> T:
        """fn() with botocore's errors translated, retried through an outage."""

        def attempt() -> T:
            with _S3Errors(uri):
                return fn()

        return self.backoff.call(what, attempt)

    def read_bytes(self, uri: str) -> bytes | None:
        loc = S3Location.parse(uri)

        def get() -> bytes | None:
            try:
                return self.client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                return None

        return self._call("read", uri, get)

    def write_bytes(self, uri: str, data: bytes) -> None:
        loc = S3Location.parse(uri)
        self._call("write", uri, lambda: self.client.put_object(Bucket=loc.bucket, Key=loc.key, Body=data))

    def _parallel(self, fn, items) -> None:
        with futures.ThreadPoolExecutor(self.FILE_WORKERS) as pool:
            for f in [pool.submit(fn, *item) for item in items]:
                f.result()

    def upload(self, files: list[tuple[Path, str]]) -> None:
        def one(src: Path, uri: str) -> None:  # each file retried on its own: the others stay uploaded
            loc = S3Location.parse(uri)
            self._call("upload", uri, lambda: self.client.upload_file(str(src), loc.bucket, loc.key, Config=self.transfer))

        self._parallel(one, files)

    def download(self, files: list[tuple[str, Path]]) -> None:
        def one(uri: str, dst: Path) -> None:
            loc = S3Location.parse(uri)
            dst.parent.mkdir(parents=True, exist_ok=True)
            self._call("download", uri, lambda: self.client.download_file(loc.bucket, loc.key, str(dst), Config=self.transfer))

        self._parallel(one, files)

    def list_keys(self, uri: str) -> list[str]:
        loc = S3Location.parse(uri)
        prefix = loc.key.rstrip("/") + "/" if loc.key else ""

        def listing() -> list[str]:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix)
            return [o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])]

        return self._call("list", uri, listing)

    def delete_prefix(self, uri: str) -> int:
        loc = S3Location.parse(uri)
        keys = [join(loc.key, k) for k in self.list_keys(uri)]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            response = self._call("delete", uri, lambda: self.client.delete_objects(Bucket=loc.bucket, Delete=batch))
            if errors := response.get("Errors"):  # per-key failures come back in a 200 response
                first = errors[0]
                kind = StorageAccessDenied if first.get("Code") == "AccessDenied" else StorageUnavailable
                raise kind(f"{uri}: could not delete {len(errors)} objects, e.g. {first.get('Key')}: "
                           f"{first.get('Code')} {first.get('Message', '')}".strip())
        return len(keys)

    def check_access(self, uri: str) -> None:
        loc = S3Location.parse(uri)
        probe = join(uri, f".kondense-probe-{os.getpid()}")
        self.write_bytes(probe, b"")
        self._call("delete", probe, lambda: self.client.delete_object(Bucket=loc.bucket, Key=S3Location.parse(probe).key))


class _S3Errors:
    """Translate botocore errors into the store's kinds, naming the URI; StoreOutage when waiting can help."""

    DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403", "401"}
    # 4xx answers that mean "not now" rather than "never"; every 5xx is an outage too.
    TRANSIENT = {"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"}

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectionError as BotoConnectionError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
            exc = exc.__context__  # boto3 wraps the ClientError of an upload; classify the original
        if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
            exc = exc.last_exception  # s3transfer gave up re-reading a download stream
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            raise StorageAccessDenied(
                f"{self.uri}: no S3 credentials. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(in a cluster: spec.storage.credentialsSecret)."
            ) from None
        if isinstance(exc, BotoConnectionError):
            raise StoreOutage(f"{self.uri}: cannot reach the S3 endpoint ({exc}).") from None
        # reset, closed or timed out mid-transfer (builtins: a socket error botocore did not wrap)
        if isinstance(exc, (HTTPClientError, IncompleteReadError, ConnectionError, TimeoutError)):
            raise StoreOutage(f"{self.uri}: the connection to the S3 endpoint failed ({type(exc).__name__}: {exc}).") from None
        if isinstance(exc, S3UploadFailedError):
            text = str(exc)
            if any(code in text for code in self.DENIED):
                raise StorageAccessDenied(f"{self.uri}: access denied ({text}).") from None
            if "NoSuchBucket" in text:
                raise InvalidSpec(f"{self.uri}: the bucket does not exist. Create it or fix spec.storage.uri.") from None
            raise StorageUnavailable(f"{self.uri}: upload failed ({text}).") from None
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in self.DENIED or status in (401, 403):
                raise StorageAccessDenied(f"{self.uri}: access denied ({code}). Check the credentials and bucket policy.") from None
            if code == "NoSuchBucket":
                raise InvalidSpec(f"{self.uri}: the bucket does not exist. Create it or fix spec.storage.uri.") from None
            if code in ("404", "NoSuchKey"):
                raise InvalidInput(f"{self.uri}: not found.") from None
            kind = StoreOutage if status >= 500 or status in (0, 408, 429) or code in self.TRANSIENT else StorageUnavailable
            raise kind(f"{self.uri}: {code or status} from S3 ({exc}).") from None
        return False


def open_store(
    uri: str,
    endpoint: str | None = None,
    region: str | None = None,
    max_attempts: int = STAGE_ATTEMPTS,
    outage_window: float | None = None,
) -> Store:
    """The store for a URI.

    Stages ride out an outage of the store: each operation is retried for up to OUTAGE_WINDOW
    seconds. Interactive and operator-side checks pass max_attempts=FAIL_FAST_ATTEMPTS (or fewer)
    and fail fast, without an outage window; `outage_window` sets one explicitly.
    """
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return FileStore()
    if scheme == "s3":
        return S3Store(endpoint=endpoint, region=region, max_attempts=max_attempts, outage_window=outage_window)
    raise InvalidSpec(f"{uri}: storage must be s3://bucket/prefix or file:///path")


def artifact_uri(storage_uri: str, namespace: str, pipeline: str, stage: str, input_digest: str) -> str:
    """<storage>/<namespace>/<pipeline>/<stage>-<digest12>: a content address per stage version."""
    return join(storage_uri, namespace, pipeline, f"{stage}-{short(input_digest)}")


def short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def dumps_canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
