"""One entrypoint for every stage: `python -m kondense_jobs <stage-kind> --spec stage.json`.

The operator's Jobs and `kondense run` both start stages this way. The process prints progress
as structured lines, writes a one-line JSON summary to the termination-message file and exits
with a code from kondense.errors that tells retryable failures from permanent ones.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Iterator

from pydantic import ValidationError

from kondense.api import StageRun, Summary
from kondense.errors import BY_REASON, InvalidSpec, KondenseError, QualityGateFailed, Reason, outcome_for_exit
from kondense.events import Progress, format_line, summary_line

log = logging.getLogger("kondense_jobs")

# stage kind -> "module:function"; imported lazily so that a missing heavy dependency
# becomes a MissingDependency error instead of an ImportError at startup.
STAGES = {
    "distill": "kondense_jobs.distill:run",
    "quantize": "kondense_jobs.quantize:run",
    "evaluate": "kondense_jobs.evaluate:run",
    "teacher_logits": "kondense_jobs.teacher_logits:run",
}

DEFAULT_TERMINATION_LOG = "/dev/termination-log"


def load_stage(kind: str):
    if kind not in STAGES:
        raise InvalidSpec(f"unknown stage kind {kind!r}; known kinds: {', '.join(sorted(STAGES))}")
    module, _, fn = STAGES[kind].partition(":")
    return getattr(importlib.import_module(module), fn)


def read_spec(path: Path, kind: str) -> StageRun:
    try:
        run = StageRun.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise InvalidSpec(f"--spec {path}: no such file") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidSpec(f"{path}: {where}: {first['msg']} ({e.error_count()} errors)") from None
    if run.stage_kind != kind:
        raise InvalidSpec(f"{path} is a {run.stage_kind} stage, not {kind}")
    if run.config is None:
        raise InvalidSpec(f"{path}: the {kind} section is missing")
    return run


def already_published(run: StageRun) -> Summary | None:
    """The summary of a committed artifact for this very input digest: nothing to recompute."""
    from kondense.api import Report
    from kondense.store import open_store

    manifest = open_store(run.output, run.storage.endpoint, run.storage.region).read_manifest(run.output)
    if manifest is None or manifest.input_digest != run.input_digest:
        return None
    gate = manifest.extra.get("gate")
    if gate and not gate.get("passed", True):  # a published report whose gate failed stays failed
        raise QualityGateFailed(str(gate.get("message", "quality gate failed")))
    log.info("Stage %s is up to date: %s already holds its artifact", run.stage, run.output)
    report = manifest.extra.get("report")
    return Summary(
        state="Succeeded",
        reason=Reason.UP_TO_DATE,
        message=f"already published at {run.output}",
        metrics=manifest.metrics,
        artifact=manifest.artifact(run.output),
        report=Report.model_validate(report) if report else None,
    )


def classify(exc: BaseException) -> tuple[str, str]:
    """(reason, message) of an exception, one line, never a credential."""
    if isinstance(exc, KondenseError):
        return exc.reason, str(exc)
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        return Reason.CUDA_OUT_OF_MEMORY, f"CUDA out of memory: {str(exc).splitlines()[0][:300]}"
    if isinstance(exc, MemoryError):
        return Reason.OOM_KILLED, "host memory exhausted"
    return Reason.ERROR, f"{name}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


TERMINATION_LIMIT = 4000  # the kubelet keeps at most 4096 bytes of a termination message


def _rounded(value, digits: int = 6):
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def termination_message(summary: Summary, limit: int = TERMINATION_LIMIT) -> str:
    """The summary line within `limit` bytes, still a whole summary (a cut line parses as nothing).

    It gives up, in turn, until one fits: digits past the sixth; the metrics (the stdout line and
    the log keep them; an evaluate stage's are its report's numbers); the report rows' task scores
    and notes; the report's rows (report.json at report.uri has everything).
    """
    doc = summary.dump()
    shrinks = [
        lambda d: d.update(_rounded(d)),
        lambda d: d.pop("metrics", None),
        lambda d: [row.pop(k, None) for row in (d.get("report") or {}).get("table", []) for k in ("tasks", "note", "missing")],
        lambda d: (d.get("report") or {}).pop("table", None),
        lambda d: d.update(message=d.get("message", "")[:1000]),
    ]
    line = format_line("summary", **doc)
    for shrink in shrinks:
        if len(line.encode()) <= limit:
            break
        shrink(doc)
        line = format_line("summary", **doc)
    return line


def write_termination(summary: Summary, path: str | None) -> None:
    """The summary as the last stdout line and the termination message.

    A worker under kondense_jobs.launch writes only its own summary file; the launcher then
    writes the pod's one termination message and line (see kondense_jobs.launch).
    """
    line = summary_line(summary)
    if ranks := os.environ.get("KONDENSE_SUMMARY_DIR"):
        (Path(ranks) / f"rank-{os.environ.get('RANK', '0')}.json").write_text(line)
        return
    print(line, flush=True)
    target = path or os.environ.get("KONDENSE_TERMINATION_LOG") or DEFAULT_TERMINATION_LOG
    try:
        with open(target, "w") as f:
            f.write(termination_message(summary))
    except OSError:
        if path:  # asked for explicitly: say so; the default may simply not exist outside a pod
            log.warning("cannot write the termination message to %s", target)


@contextlib.contextmanager
def work_dir(base: Path | None, stage: str) -> Iterator[Path]:
    """Scratch space: private to the process, or shared by a node's workers under the launcher.

    The workers of one node share it because the Trainer's checkpoint folder is written by all of
    them (one shard file each under FSDP); the node's first worker removes it at the end.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        with tempfile.TemporaryDirectory(prefix=f"kondense-{stage}-", dir=base) as work:
            yield Path(work)
        return
    shared = Path(base or tempfile.gettempdir()) / f"kondense-{stage}-{run_id}"
    shared.mkdir(parents=True, exist_ok=True)
    try:
        yield shared
    finally:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            shutil.rmtree(shared, ignore_errors=True)


class Once(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kondense_jobs", description=__doc__.splitlines()[0])
    parser.add_argument("kind", help=f"stage kind: {', '.join(sorted(STAGES))}")
    parser.add_argument("--spec", required=True, type=Path, help="the StageRun JSON document")
    parser.add_argument("--termination-log", help=f"summary file (default $KONDENSE_TERMINATION_LOG or {DEFAULT_TERMINATION_LOG})")
    parser.add_argument("--work-dir", type=Path, help="scratch space (default: a temp dir)")
    parser.add_argument("--cache-dir", type=Path, help="input cache (default $KONDENSE_CACHE or ~/.cache/kondense)")
    args = parser.parse_args(argv)

    worker = int(os.environ.get("RANK", "0"))
    logging.basicConfig(  # workers other than rank 0 log warnings and errors only: one voice per stage
        level=os.environ.get("KONDENSE_LOG_LEVEL", "INFO") if worker == 0 else "WARNING",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "urllib3", "s3transfer", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns at every forward pass of an int8 layer fed fp32 (an int8 teacher or variant on CPU)
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(Once())

    from kondense_jobs.runtime import Context

    try:
        stage_fn = load_stage(args.kind)
        run = read_spec(args.spec, args.kind)
        cache = args.cache_dir or Path(os.environ.get("KONDENSE_CACHE", Path.home() / ".cache" / "kondense"))
        summary = already_published(run)
        if summary is None:
            with work_dir(args.work_dir, run.stage) as work:
                log.info("Stage %s (%s) -> %s", run.stage, run.stage_kind, run.output)
                quiet = None if worker == 0 else Progress(run.stage, out=open(os.devnull, "w"))  # noqa: SIM115
                summary = stage_fn(Context(run, work, cache, progress=quiet))
    except KeyboardInterrupt:
        summary = Summary(state="Failed", reason=Reason.INTERRUPTED, message="interrupted")
        write_termination(summary, args.termination_log)
        return 130
    except BaseException as exc:  # noqa: BLE001 - turned into a reason and an exit code
        reason, message = classify(exc)
        if reason == Reason.ERROR:
            traceback.print_exc()
        else:
            log.error("%s: %s", reason, message)
        write_termination(Summary(state="Failed", reason=reason, message=message), args.termination_log)
        return BY_REASON[reason].exit_code
    write_termination(summary, args.termination_log)
    return 0 if summary.state == "Succeeded" else outcome_for_exit(1).exit_code


if __name__ == "__main__":
    sys.exit(main())
