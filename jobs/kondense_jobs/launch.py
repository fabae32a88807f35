"""`python -m kondense_jobs.launch`: torch's launcher around a stage, with the stage's exit code kept.

    python -m kondense_jobs.launch --nnodes 1 --nproc-per-node 4 --standalone -- distill --spec stage.json
    python -m kondense_jobs.launch --nnodes 2 --nproc-per-node 8 --rdzv-endpoint job-0.svc:29400 \\
        --rdzv-id job -- distill --spec stage.json

torchrun (torch.distributed.run) starts the workers and tears them all down when one fails,
but exits 1 whatever the worker's code was, so an InsufficientResources (14) on rank 3 would
look retryable. This wrapper runs torch.distributed.run in-process and:

- gives each worker its own summary file (KONDENSE_SUMMARY_DIR/rank-<RANK>.json) instead of
  the pod's termination-message file;
- after the workers exit, writes ONE termination message: rank 0's summary when all
  succeeded, else the summary of the worker that failed first (torchrun's root cause), or one
  made from its exit code when it died without writing (SIGKILL: OOMKilled);
- exits with that worker's code, so the Job's podFailurePolicy and the local runner read the
  same exit-code table as for a single process.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from kondense.api import Summary
from kondense.errors import outcome_for_exit
from kondense.events import parse_summary

from kondense_jobs.__main__ import write_termination

log = logging.getLogger("kondense_jobs.launch")

SUMMARY_DIR_ENV = "KONDENSE_SUMMARY_DIR"
MAX_RESTARTS = 0  # a failed worker fails the pod; the Job's backoffLimit (or the local runner) retries
# How long the pods of a multi-node stage wait for each other. torchrun's c10d default gives a pod
# 60 s to reach the store at index 0, less than a slow image pull or a node scaled up for pod 0.
RDZV_WAIT_SECONDS = 1800


def summary_path(directory: str | os.PathLike, rank: int) -> Path:
    return Path(directory) / f"rank-{rank}.json"


def exit_code_of(worker_exit: int) -> int:
    """A worker's exit code as a shell reports it: -9 (killed by SIGKILL) -> 137."""
    return 128 - worker_exit if worker_exit < 0 else worker_exit


def read_summary(directory: Path, rank: int) -> Summary | None:
    path = summary_path(directory, rank)
    return parse_summary(path.read_text()) if path.exists() else None


def outcome(directory: Path, failures: dict[int, int], first: int | None) -> tuple[Summary, int]:
    """(summary, exit code) of the pod from the workers' summaries and torchrun's failures (rank -> exit)."""
    if first is None:
        ranks = sorted(int(p.stem.split("-")[1]) for p in directory.glob("rank-*.json"))
        summary = read_summary(directory, ranks[0]) if ranks else None
        if summary is None:
            return Summary(state="Failed", reason="Error", message="no worker wrote a summary"), 1
        return summary, 0 if summary.state == "Succeeded" else 1
    code = exit_code_of(failures[first])
    summary = read_summary(directory, first)
    if summary is None or summary.state == "Succeeded":
        o = outcome_for_exit(code)
        why = f"killed by signal {signal.Signals(-failures[first]).name}" if failures[first] < 0 else f"exit code {code}"
        summary = Summary(state="Failed", reason=o.reason, message=f"worker {first} ended ({why}) without a summary")
    else:
        summary = summary.model_copy(update={"message": f"worker {first}: {summary.message}"})
    return summary, code


def torchrun_args(args: argparse.Namespace, stage_argv: list[str]) -> list[str]:
    out = ["--nnodes", str(args.nnodes), "--nproc-per-node", str(args.nproc_per_node), "--max-restarts", str(MAX_RESTARTS)]
    if args.standalone:
        out.append("--standalone")
    else:
        out += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id,
                "--rdzv-conf", f"read_timeout={RDZV_WAIT_SECONDS},join_timeout={RDZV_WAIT_SECONDS}"]
    return [*out, "--module", "kondense_jobs", *stage_argv]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m kondense_jobs.launch [launcher options] -- <stage kind> --spec FILE ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m kondense_jobs.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("--standalone", action="store_true", help="one node: rendezvous on a free local port")
    parser.add_argument("--rdzv-endpoint", help="host:port of the c10d store (the pod of index 0)")
    parser.add_argument("--rdzv-id", help="the same id on every node (the Job's name)")
    args = parser.parse_args(argv[:split])
    stage_argv = argv[split + 1 :]
    if not args.standalone and not (args.rdzv_endpoint and args.rdzv_id):
        parser.error("several nodes need --rdzv-endpoint and --rdzv-id")
    termination = _option(stage_argv, "--termination-log")
    logging.basicConfig(level=os.environ.get("KONDENSE_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    with tempfile.TemporaryDirectory(prefix="kondense-ranks-") as summaries:
        os.environ[SUMMARY_DIR_ENV] = summaries
        failures: dict[int, int] = {}
        first = None
        try:
            torchrun.run(torchrun.parse_args(torchrun_args(args, stage_argv)))
        except ChildFailedError as e:
            failures = {rank: f.exitcode for rank, f in e.failures.items()}
            first = e.get_first_failure()[0]
        summary, code = outcome(Path(summaries), failures, first)
    del os.environ[SUMMARY_DIR_ENV]  # the pod's own message now
    write_termination(summary, termination)
    return code


def _option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


if __name__ == "__main__":
    sys.exit(main())
