"""Resumable passes, chunk by chunk: a long computation (the teacher's top-k logits, the teacher's
completions) is cut into numbered chunks, each published to the store with its own manifest as it
completes. A chunk is committed when its manifest exists, carries the run's input digest and
lists exactly the expected files; a restarted stage skips the committed chunks, so a kill costs at
most the chunk in progress. Consumers read committed chunks only.
"""

from __future__ import annotations

from pathlib import Path

from kondense.store import Manifest, join

from kondense_jobs.runtime import Context


def chunk_dir(index: int) -> str:
    return f"chunks/{index:05d}"


class Chunks:
    """The chunks under `base` in the store: which are committed for this input digest, committing one."""

    def __init__(self, ctx: Context, base: str, files: set[str], format: str):
        self.store, self.run = ctx.store, ctx.run
        self.base, self.files, self.format = base, frozenset(files), format

    def uri(self, index: int) -> str:
        return join(self.base, chunk_dir(index))

    def committed(self, index: int) -> Manifest | None:
        """The chunk's manifest when it is committed for this run's inputs, else None."""
        manifest = self.store.read_manifest(self.uri(index))
        if manifest is None or manifest.input_digest != self.run.input_digest or set(manifest.files) != self.files:
            return None
        return manifest

    def commit(self, index: int, folder: Path, metrics: dict[str, float]) -> Manifest:
        """Publish the chunk's folder (its files, then its manifest: the commit point)."""
        return self.store.publish(
            folder, self.uri(index), stage=self.run.stage, stage_kind=self.run.stage_kind,
            input_digest=self.run.input_digest, format=self.format, metrics=metrics,
        )
