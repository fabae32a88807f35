"""Resumable training checkpoints in the store: `<output>.checkpoints/step-<N>/`, manifest.json last.

Every checkpointEvery steps the Trainer's checkpoint folder is staged under
`ctx.checkpoint_uri()/step-<N>`; the newest two are kept. A starting stage resumes from the
newest complete checkpoint whose inputDigest matches its own, so the step count, the optimizer,
the schedule and the loss history continue. Once the student is published the staged
checkpoints are deleted: a published stage is never recomputed.

With several workers every one of them calls `stage` (the Trainer runs callbacks everywhere):
- one node: they wait for each other (all files written), then rank 0 uploads the folder in a
  background thread, so training does not wait for the upload;
- several nodes: each node's first worker uploads what its node wrote (FSDP writes one shard
  file per worker), then rank 0 commits one manifest over all of them.
A sharded (FSDP) checkpoint is torch.distributed.checkpoint's format, which reshards on load:
a stage resumes on a different worker count.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kondense.errors import InvalidInput
from kondense.store import FileStore, S3Store, Store, join

from kondense_jobs.parallel import World
from kondense_jobs.runtime import Context

log = logging.getLogger("kondense_jobs.distill")

CHECKPOINTS_KEPT = 2
STEP_DIR = re.compile(r"step-(\d+)")
SHARDED_MODEL = "pytorch_model_fsdp_"  # accelerate's folder of a model's FSDP shards in a checkpoint


def list_dirs(store: Store, uri: str) -> list[str]:
    """Names of the immediate sub-folders of uri (committed or not). The Store has no listing primitive."""
    if isinstance(store, FileStore):
        root = store.path(uri)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if isinstance(store, S3Store):
        return sorted({k.split("/", 1)[0] for k in store.list_keys(uri) if "/" in k})
    raise NotImplementedError(f"cannot list {uri} in {type(store).__name__}")


@dataclass(frozen=True)
class Resume:
    step: int
    path: Path
    uri: str

    @property
    def sharded(self) -> bool:
        """Written by FSDP workers: torch.distributed.checkpoint shards, not the full state."""
        return any(self.path.glob(f"{SHARDED_MODEL}*"))


class Checkpoints:
    """The stage's resumable checkpoints."""

    def __init__(self, ctx: Context, world: World | None = None):
        self.ctx, self.store, self.uri = ctx, ctx.store, ctx.checkpoint_uri()
        self.world = world or World()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
        self._pending: Future | None = None

    def steps(self) -> list[int]:
        """Every step folder, newest first, committed or not."""
        found = (m.group(1) for n in list_dirs(self.store, self.uri) if (m := STEP_DIR.fullmatch(n)))
        return sorted(map(int, found), reverse=True)

    def committed(self) -> list[int]:
        """Steps whose manifest exists and belongs to this stage version, newest first."""
        out = []
        for step in self.steps():
            manifest = self.store.read_manifest(join(self.uri, f"step-{step}"))
            if manifest is not None and manifest.input_digest == self.ctx.run.input_digest:
                out.append(step)
        return out

    def latest(self, dest: Path) -> Resume | None:
        """The newest complete checkpoint in dest, the same for every worker.

        Rank 0 picks it (falling back to an older one if one is corrupt) and fetches it; the
        first worker of every other node then fetches that same step; the rest wait.
        """
        found = self._fetch_latest(dest) if self.world.is_main else None
        step = self.world.gather(found.step if found else None)[0]
        if step is None:
            return None
        uri = join(self.uri, f"step-{step}")
        if self.world.is_local_main and not self.world.is_main:
            self.store.fetch(uri, dest / f"step-{step}", expect_input_digest=self.ctx.run.input_digest)
        self.world.barrier()
        return Resume(step, dest / f"step-{step}", uri)

    def _fetch_latest(self, dest: Path) -> Resume | None:
        for step in self.committed():  # falling back to older ones if one is corrupt
            uri = join(self.uri, f"step-{step}")
            try:
                self.store.fetch(uri, dest / f"step-{step}", expect_input_digest=self.ctx.run.input_digest)
            except InvalidInput as e:
                log.warning("Skipping checkpoint %s: %s", uri, e)
                continue
            return Resume(step, dest / f"step-{step}", uri)
        return None

    def stage(self, folder: Path, step: int) -> None:
        """Stage a checkpoint folder that every worker has finished writing; see the module docstring."""
        self.world.barrier()
        if self.world.nodes == 1:
            if self.world.is_main:
                self.wait()
                self._pending = self._pool.submit(self._publish, folder, step)
            return
        uri = join(self.uri, f"step-{step}")
        files = self.store.upload_folder(folder, uri) if self.world.is_local_main else {}
        merged = {}
        for node_files in self.world.gather(files):
            merged |= node_files
        if self.world.is_main:
            self._commit(uri, merged, step)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _publish(self, folder: Path, step: int) -> None:
        uri = join(self.uri, f"step-{step}")
        self._commit(uri, self.store.upload_folder(folder, uri), step)

    def _commit(self, uri: str, files: dict, step: int) -> None:
        run = self.ctx.run
        self.store.commit(
            uri, files, stage=run.stage, stage_kind=run.stage_kind, input_digest=run.input_digest,
            format="checkpoint", metrics={"step": float(step)},
        )
        keep = set(self.committed()[:CHECKPOINTS_KEPT])
        for old in self.steps():
            if old not in keep and old < step:
                self.store.delete_prefix(join(self.uri, f"step-{old}"))
        log.info("Checkpoint of step %d staged at %s", step, uri)

    def clear(self) -> None:
        self.wait()
        self._pool.shutdown()
        if self.world.is_main:
            self.store.delete_prefix(self.uri)
