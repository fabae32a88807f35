"""The worker's place in a distributed stage, read from the variables torch's launcher sets.

A stage runs as one process, or as `WORLD_SIZE` processes under `python -m kondense_jobs.launch`
(torch.distributed.run). The stage code is the same either way: it asks `World` who it is,
lets the node's first worker fetch inputs while the others wait, and lets rank 0 alone write
progress, checkpoints' manifests, the published artifact and the termination message.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

from kondense_jobs.runtime import cpu_budget, require

log = logging.getLogger("kondense_jobs.parallel")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> World:
        env = os.environ if env is None else env
        size = int(env.get("WORLD_SIZE", "1"))
        return cls(
            rank=int(env.get("RANK", "0")),
            size=size,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            local_size=int(env.get("LOCAL_WORLD_SIZE", str(size))),
        )

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))

    def init(self) -> None:
        """Join the process group (NCCL on GPUs, gloo on CPU) and share the CPUs among local workers."""
        if not self.distributed:
            return
        torch = require("torch", "distributed training")
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
        else:  # torchrun sets OMP_NUM_THREADS=1; CPU workers get their share of the pod's CPUs instead
            torch.set_num_threads(max(1, cpu_budget() // self.local_size))
        if not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend=backend)
            log.info("Worker %d of %d (local %d of %d) joined the %s process group", self.rank, self.size,
                     self.local_rank, self.local_size, backend)

    def barrier(self) -> None:
        if self.distributed:
            require("torch", "distributed training").distributed.barrier()

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """The node's first worker runs the block (a fetch into the shared cache) before the others."""
        if not self.is_local_main:
            self.barrier()
        yield
        if self.is_local_main:
            self.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """obj from every worker, in rank order (every worker must call it)."""
        if not self.distributed:
            return [obj]
        torch = require("torch", "distributed training")
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def device(self):
        torch = require("torch", "distributed training")
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def shutdown(self) -> None:
        torch = require("torch", "distributed training")
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
