"""What every stage shares: its inputs fetched and verified, its scratch space, publishing.

A stage's `run(ctx)` reads as three steps:
    model = ctx.model_dir("model")            # fetch inputs (verified against manifest.json)
    ... transform into ctx.output_dir() ...
    return ctx.publish(metrics={...})         # upload, then manifest.json last
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

from kondense.api import InputRef, StageRun, Summary
from kondense.errors import InvalidInput, InvalidSpec, MissingDependency
from kondense.events import Progress
from kondense.store import MANIFEST, FileStore, Manifest, S3Store, Store, join, open_store, short, verify

log = logging.getLogger("kondense_jobs")

LIBRARIES = (
    "kondense",
    "torch",
    "transformers",
    "trl",
    "accelerate",
    "bitsandbytes",
    "llmcompressor",
    "compressed-tensors",
    "gguf",
    "llama_cpp_python",
)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def cpu_budget(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: its affinity, capped by a cgroup CPU quota.

    A Kubernetes CPU limit is a CFS quota, not an affinity mask: a pod limited to 4 CPUs on a
    64-core node still sees 64, and a thread pool of 64 then spends most of its time throttled.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = period = None
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        raw_quota, raw_period = (cgroup / "cpu.max").read_text().split()
        if raw_quota != "max":
            quota, period = int(raw_quota), int(raw_period)
    except (OSError, ValueError):
        try:  # cgroup v1
            q = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            if q > 0:
                quota, period = q, int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota and period:
        cpus = min(cpus, max(1, -(-quota // period)))  # ceil: 1.5 CPUs get 2 threads
    return max(1, cpus)


def require(module: str, feature: str):
    """Import an optional dependency or say how to get it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise MissingDependency(
            f"{feature} needs the Python package {module.split('.')[0]!r} ({e}). "
            "To resolve, pip install 'kondense[jobs]' or use the kondense jobs image."
        ) from e


class Context:
    """One stage execution: the StageRun document, the store and local folders."""

    def __init__(self, run: StageRun, work_dir: Path, cache_dir: Path, progress: Progress | None = None):
        self.run = run
        self.work_dir = work_dir
        self.cache_dir = cache_dir
        self.progress = progress or Progress(run.stage)
        self.metrics: dict[str, float] = {}

    @property
    def config(self):
        return self.run.config

    @cached_property
    def store(self) -> Store:
        return open_store(self.run.storage.uri, self.run.storage.endpoint, self.run.storage.region)

    # -- inputs ----------------------------------------------------------------------------
    def model_dir(self, role: str) -> Path:
        """A local folder holding the input model `role` (teacher, student, model, or a variant)."""
        if role not in self.run.models:
            raise InvalidSpec(f"stage {self.run.stage} has no input {role!r} (has {sorted(self.run.models)})")
        return self.fetch(self.run.models[role], role)

    def input_manifest(self, role: str) -> Manifest | None:
        path = self.model_dir(role) / MANIFEST
        return Manifest.model_validate_json(path.read_text()) if path.exists() else None

    def fetch(self, ref: InputRef, what: str) -> Path:
        scheme = urlparse(ref.uri).scheme
        if ref.stage:  # an earlier stage's artifact: manifest must exist and match
            return self._fetch_artifact(ref, what)
        if scheme == "file":
            path = FileStore.path(ref.uri)
            if not path.exists():
                raise InvalidInput(f"{what}: {ref.uri} does not exist")
            return path
        if scheme == "pvc":
            # The operator mounts each claim read-only at $KONDENSE_PVC_ROOT/<claim>.
            parsed = urlparse(ref.uri)
            path = Path(os.environ.get("KONDENSE_PVC_ROOT", "/mnt/pvc")) / parsed.netloc / parsed.path.lstrip("/")
            if not path.exists():
                raise InvalidInput(f"{what}: {ref.uri} is not mounted at {path}")
            return path
        if scheme == "s3":
            return self._fetch_s3_folder(ref.uri, what)
        if scheme == "hf":
            return self._fetch_hub(ref, what)
        raise InvalidSpec(f"{what}: unsupported URI {ref.uri!r} (use s3://, file://, pvc:// or hf://)")

    def _fetch_artifact(self, ref: InputRef, what: str) -> Path:
        store = open_store(ref.uri, self.run.storage.endpoint, self.run.storage.region)
        local = store.local_path(ref.uri)
        if local is not None:  # file:// store: verify in place, no copy
            manifest = store.read_manifest(ref.uri)
            if manifest is None:
                raise InvalidInput(f"{what}: {join(ref.uri, MANIFEST)} is missing: re-run stage {ref.stage}.")
            if ref.input_digest and manifest.input_digest != ref.input_digest:
                raise InvalidInput(
                    f"{what}: {join(ref.uri, MANIFEST)} has inputDigest {manifest.input_digest}, "
                    f"expected {ref.input_digest}."
                )
            verify(local, manifest, ref.uri)
            return local
        dest = self.cache_dir / "artifacts" / short(ref.input_digest or ref.uri)
        if (dest / MANIFEST).exists():
            manifest = Manifest.model_validate_json((dest / MANIFEST).read_text())
            verify(dest, manifest, ref.uri)
            return dest
        log.info("Fetching %s (%s) into %s", what, ref.uri, dest)
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        store.fetch(ref.uri, partial, expect_input_digest=ref.input_digest)
        partial.rename(dest)
        return dest

    def _fetch_s3_folder(self, uri: str, what: str) -> Path:
        store = S3Store(self.run.storage.endpoint, self.run.storage.region)
        dest = self.cache_dir / "sources" / hashlib.sha256(uri.encode()).hexdigest()[:16]
        if (dest / ".complete").exists():
            return dest
        keys = [k for k in store.list_keys(uri) if not k.endswith("/")]
        if keys:
            log.info("Fetching %s (%s, %d files)", what, uri, len(keys))
            store.download([(join(uri, k), dest / k) for k in keys])
        elif (data := store.read_bytes(uri)) is not None:  # a single object, e.g. data.jsonl
            dest.mkdir(parents=True, exist_ok=True)
            (dest / uri.rsplit("/", 1)[-1]).write_bytes(data)
        else:
            raise InvalidInput(f"{what}: {uri} holds no files")
        if (dest / MANIFEST).exists():
            verify(dest, Manifest.model_validate_json((dest / MANIFEST).read_text()), uri)
        (dest / ".complete").touch()
        return dest

    def _fetch_hub(self, ref: InputRef, what: str) -> Path:
        hub = require("huggingface_hub", "hf:// model sources")
        repo = urlparse(ref.uri).netloc + urlparse(ref.uri).path
        repo, _, rev_in_uri = repo.partition("@")
        log.info("Downloading %s from the hub: %s@%s", what, repo, ref.revision or rev_in_uri or "main")
        return Path(
            hub.snapshot_download(
                repo_id=repo.strip("/"),
                revision=ref.revision or rev_in_uri or None,
                cache_dir=self.cache_dir / "hub",
                token=os.environ.get("HF_TOKEN"),
            )
        )

    def dataset_path(self) -> Path:
        return self.fetch(InputRef(uri=self.run.dataset.uri), "dataset")

    # -- outputs ---------------------------------------------------------------------------
    def output_dir(self) -> Path:
        out = self.work_dir / "output"
        out.mkdir(parents=True, exist_ok=True)
        return out

    def checkpoint_uri(self) -> str:
        """Where a training stage stages its resumable checkpoints (beside the artifact)."""
        return self.run.output.rstrip("/") + ".checkpoints"

    def publish(self, metrics: dict[str, float] | None = None, format: str = "hf", extra: dict | None = None, report=None) -> Summary:
        """Upload the output folder, manifest.json last; return the stage's summary."""
        self.metrics.update(metrics or {})
        manifest = self.store.publish(
            self.output_dir(),
            self.run.output,
            stage=self.run.stage,
            stage_kind=self.run.stage_kind,
            input_digest=self.run.input_digest,
            format=format,
            metrics=self.metrics,
            spec=self.run.dump(),
            versions=library_versions(),
            extra=extra,
        )
        log.info("Published %s (%d files, %d bytes)", self.run.output, len(manifest.files), manifest.size_bytes)
        return Summary(
            state="Succeeded",
            reason="Succeeded",
            message=f"published {self.run.output}",
            metrics=self.metrics,
            artifact=manifest.artifact(self.run.output),
            report=report,
        )
