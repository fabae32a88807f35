"""`kondense run`: the pipeline's stages as local processes, with the cluster's semantics.

The same plan decides what runs, the same entrypoint runs it (`python -m kondense_jobs`),
the same store holds the artifacts, and a status document of the CR's shape is kept in
`<state-dir>/status.json` as it goes. Finished stages are skipped on the next run; an
interrupted training stage resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from kondense import events, preload
from kondense.api import CompressionPipeline, PipelineStatus, Report, StageStatus, Summary
from kondense.errors import HINTS, InvalidSpec, Reason, outcome_for_exit
from kondense.launch import stage_command
from kondense.plan import StagePlan, decide, missing_reasons, resolve, settle, stage_run
from kondense.status import now_rfc3339, summarize
from kondense.store import Store, open_store


@dataclass
class Proc:
    plan: StagePlan
    popen: subprocess.Popen | preload.Forked
    termination: Path
    log: TextIO
    reader: threading.Thread
    last: dict = field(default_factory=dict)
    began: float = field(default_factory=time.monotonic)


class Display:
    """Progress on a terminal (one redrawn line per stage) or plain lines in a log/CI."""

    def __init__(self, out: TextIO):
        self.out = out
        self.tty = out.isatty()
        self._drawn = 0
        self._last_plain: dict[str, str] = {}

    def draw(self, stages: list[StageStatus]) -> None:
        if self.tty:
            lines = [self._line(s) for s in stages]
            self.out.write("\x1b[F\x1b[2K" * self._drawn + "\n".join(lines) + "\n")
            self._drawn = len(lines)
        else:  # a log or CI: a line per state change and per 10% of progress
            for s in stages:
                key = f"{s.state} {self._decile(s.progress)}"
                if self._last_plain.get(s.name) != key and s.state != "Pending":
                    self._last_plain[s.name] = key
                    self.out.write(self._line(s) + "\n")
        self.out.flush()

    @staticmethod
    def _decile(progress: str | None) -> int:
        try:
            step, total = (int(x) for x in (progress or "").split()[0].split("/"))
            return 10 * step // max(total, 1)
        except (ValueError, IndexError):
            return -1

    @staticmethod
    def _line(s: StageStatus) -> str:
        bar = ""
        if s.state == "Running" and s.progress:
            try:
                step, total = (int(x) for x in s.progress.split()[0].split("/"))
                filled = int(20 * step / max(total, 1))
                bar = f" [{'#' * filled}{'.' * (20 - filled)}]"
            except ValueError:
                pass
        detail = s.progress if s.state == "Running" else (s.reason or "")
        if s.state == "Failed" and s.message:
            detail = f"{s.reason}: {s.message}"
        return f"  {s.name:<12} {s.state:<9}{bar} {detail or ''}".rstrip()


class LocalRunner:
    def __init__(
        self,
        pipeline: CompressionPipeline,
        state_dir: Path,
        parallel: int = 1,
        out: TextIO = sys.stdout,
        cache_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.pipeline = pipeline
        self.spec = pipeline.spec
        self.namespace = pipeline.metadata.namespace
        self.name = pipeline.metadata.name
        self.state_dir = state_dir
        self.parallel = parallel
        self.out = out
        self.cache_dir = cache_dir
        self.env = env or {}
        self.plans = resolve(self.spec, self.namespace, self.name)
        for p in self.plans:
            if p.resources.nodes > 1:
                raise InvalidSpec(
                    f"spec.stages[{p.index}].resources.nodes: {p.resources.nodes} nodes need a cluster (an Indexed Job); "
                    "on one machine use nodes 1 and set workers (or gpus) to run several workers"
                )
        self.current = self.plans  # with what each stage runs without (plan.settle), as stages fail
        self.by_name = {p.name: p for p in self.plans}
        self.stages = {p.name: StageStatus(name=p.name, input_digest=p.input_digest) for p in self.plans}
        self.status: PipelineStatus | None = None
        self.report: Report | None = None
        self.gate: tuple[bool, str] | None = None
        self.display = Display(out)
        self.executed: list[str] = []
        self.seconds: dict[str, float] = {}  # wall time of each stage run here, all attempts
        self.zygote: preload.Zygote | None = None  # the preloaded interpreter stages fork from (kondense.preload)
        self.forked: list[str] = []  # the stages that started as its children

    # -- store facts -----------------------------------------------------------------------
    def _store(self) -> Store:
        return open_store(self.spec.storage.uri, self.spec.storage.endpoint, self.spec.storage.region)

    def committed(self, store: Store) -> tuple[set[str], set[str]]:
        """Stages whose artifact for the current digest exists, and those whose gate failed."""
        done, gated = set(), set()
        for p in self.current:
            manifest = store.read_manifest(p.output)
            if manifest and manifest.input_digest == p.input_digest:
                s = self.stages[p.name]
                gate = manifest.extra.get("gate")
                if gate and not gate.get("passed", True):
                    gated.add(p.name)
                    s.state, s.reason, s.message = "Failed", Reason.QUALITY_GATE_FAILED, str(gate.get("message"))
                    self._load_report(manifest.extra)
                    continue
                done.add(p.name)
                if s.state != "Succeeded":
                    s.state, s.reason = "Succeeded", Reason.UP_TO_DATE
                    s.artifact = manifest.artifact(p.output)
                    s.metrics = manifest.metrics or None
                    if p.kind == "evaluate":
                        self._load_report(manifest.extra)
        return done, gated

    def _load_report(self, extra: dict) -> None:
        if "report" in extra:
            self.report = Report.model_validate(extra["report"])
        if "gate" in extra:
            self.gate = (bool(extra["gate"]["passed"]), str(extra["gate"]["message"]))

    # -- processes -------------------------------------------------------------------------
    def settle(self, failed: set[str]) -> None:
        """The plans as they stand with `failed`: a stage that runs without an input says which."""
        self.current = settle(self.plans, failed, self.spec.storage.uri, self.namespace, self.name)
        self.by_name = {p.name: p for p in self.current}
        for p in self.current:
            self.stages[p.name].input_digest = p.input_digest

    def start(self, plan: StagePlan) -> Proc:
        failures = {
            name: f"{s.reason}: {s.message}" if s.message else str(s.reason)
            for name, s in self.stages.items()
            if s.state == "Failed"
        }
        reasons = missing_reasons(self.current, failures)
        run = stage_run(self.spec, self.current, plan.name, self.namespace, self.name, reasons)
        spec_path = self.state_dir / f"{plan.name}.json"
        spec_path.write_text(json.dumps(run.dump(), indent=2))
        termination = self.state_dir / f"{plan.name}.termination"
        termination.unlink(missing_ok=True)
        log = open(self.state_dir / "logs" / f"{plan.name}.log", "a")
        stage_args = ["--spec", str(spec_path), "--termination-log", str(termination)]
        if self.cache_dir:
            stage_args += ["--cache-dir", str(self.cache_dir)]
        cmd = stage_command(plan.kind, stage_args, plan.resources, python=sys.executable, sharded=run.sharded)
        began = time.monotonic()  # the stage's time includes waiting for the preloaded interpreter
        popen = self._fork(plan, cmd) or subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=self._env()
        )
        proc = Proc(plan, popen, termination, log, threading.Thread(daemon=True), began=began)
        proc.reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        proc.reader.start()
        s = self.stages[plan.name]
        s.state, s.reason, s.message, s.progress = "Running", Reason.RUNNING, None, None
        s.attempts += 1
        s.started_at, s.finished_at = now_rfc3339(), None
        self.executed.append(plan.name)
        return proc

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **self.env}

    def _fork(self, plan: StagePlan, cmd: list[str]) -> preload.Forked | None:
        """The stage as a child of the preloaded interpreter (kondense.preload), started with the
        first stage that can use it; None where it cannot (a plain process is started instead): a
        stage with GPUs, or one under the launcher (module_of answers None for its command)."""
        target = preload.module_of(cmd)
        env = self._env()
        if target is None or plan.resources.gpus > 0 or not preload.wanted(env):
            return None
        if self.zygote is None:
            with open(self.state_dir / "logs" / "zygote.log", "a") as log:  # the zygote keeps its own copy
                self.zygote = preload.Zygote(sys.executable, env, log)
        child = self.zygote.spawn(*target)
        if child is not None:
            self.forked.append(plan.name)
        return child

    def _read(self, proc: Proc) -> None:
        assert proc.popen.stdout is not None
        for line in proc.popen.stdout:
            proc.log.write(line)
            ev = events.parse_line(line)
            if ev and ev[events.KEY] == "progress":
                proc.last = ev
                self.stages[proc.plan.name].progress = events.describe(ev)
        proc.log.flush()

    def finish(self, proc: Proc, code: int) -> bool:
        """Record a finished process; True when it should be retried."""
        proc.reader.join()
        proc.log.close()
        s = self.stages[proc.plan.name]
        s.finished_at = now_rfc3339()
        self.seconds[proc.plan.name] = self.seconds.get(proc.plan.name, 0.0) + time.monotonic() - proc.began
        text = proc.termination.read_text() if proc.termination.exists() else ""
        summary = events.parse_summary(text) or Summary(
            state="Failed", reason=outcome_for_exit(code).reason, message=f"exited with code {code}, no summary"
        )
        if code == 0 and summary.state == "Succeeded":
            s.state, s.reason, s.message = "Succeeded", Reason.SUCCEEDED, None
            s.artifact, s.metrics = summary.artifact, summary.metrics or None
            if summary.report:
                self.report = self._whole_report(summary)
            if proc.plan.kind == "evaluate":
                self.gate = (True, "all quality gates passed")
            return False
        outcome = outcome_for_exit(code)
        retry = outcome.retryable and s.attempts <= proc.plan.resources.backoff_limit and code != 130
        s.state = "Pending" if retry else "Failed"
        s.reason = summary.reason
        hint = HINTS.get(summary.reason)
        s.message = summary.message + (f" (hint: {hint})" if hint and not retry else "")
        if summary.reason == Reason.QUALITY_GATE_FAILED:
            self.gate = (False, summary.message)
        return retry

    def _whole_report(self, summary: Summary) -> Report:
        """The evaluate stage's report as its manifest holds it: the termination message gives up the
        rows' task scores first when the summary outgrows the kubelet's 4 KB (the demo's seven variants
        with two tasks do), and this runner reads the store anyway."""
        try:
            manifest = self._store().read_manifest(summary.artifact.uri)
            return Report.model_validate(manifest.extra["report"])
        except Exception:  # the summary's report is still a report
            return summary.report

    # -- the loop --------------------------------------------------------------------------
    def write_status(self) -> PipelineStatus:
        """Derive the status from the stages and write status.json when it changed."""
        ordered = [self.stages[p.name].model_copy() for p in self.plans]
        previous = self.status
        self.status = summarize(ordered, previous, self.pipeline.metadata.generation or 1, now_rfc3339(), self.report, self.gate)
        if previous is None or previous.dump() != self.status.dump():
            doc = self.pipeline.model_copy(update={"status": self.status}).dump()
            tmp = self.state_dir / "status.json.tmp"
            tmp.write_text(json.dumps(doc, indent=2))
            os.replace(tmp, self.state_dir / "status.json")
        return self.status

    def run(self) -> PipelineStatus:
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        store = self._store()
        storage = self.spec.storage
        open_store(storage.uri, storage.endpoint, storage.region, max_attempts=2).check_access(storage.uri)
        procs: dict[str, Proc] = {}
        failed: set[str] = set()
        changed = True  # re-read the store and re-plan only when a stage ended
        try:
            while True:
                if changed:
                    self.settle(failed)
                    committed, gated = self.committed(store)
                    failed |= gated - set(procs)
                    d = decide(self.current, committed, set(procs), failed, limit=self.parallel)
                    for name in d.blocked:
                        s = self.stages[name]
                        s.state, s.reason, s.message = "Skipped", Reason.WAITING_FOR_INPUTS, "an input stage failed"
                    for name in d.start:
                        procs[name] = self.start(self.by_name[name])
                    changed = False
                self.write_status()
                self.display.draw(list(self.status.stages))
                if not procs:
                    break
                time.sleep(0.2)
                for name, proc in list(procs.items()):
                    code = proc.popen.poll()
                    if code is None:
                        continue
                    del procs[name]
                    changed = True
                    if not self.finish(proc, code) and self.stages[name].state == "Failed":
                        failed.add(name)
        except KeyboardInterrupt:
            self._interrupt(procs)
            raise
        finally:
            if self.zygote is not None:
                self.zygote.close()
                self.zygote = None
        return self.write_status()

    def _interrupt(self, procs: dict[str, Proc]) -> None:
        """Ctrl-C: the children got SIGINT too; give them time to exit, then record it."""
        for name, proc in procs.items():
            try:
                proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
            proc.reader.join()
            s = self.stages[name]
            s.state, s.reason, s.message = "Failed", Reason.INTERRUPTED, "interrupted; run again to resume"
        self.write_status()
        self.display.draw(list(self.status.stages))


def format_durations(runner: LocalRunner) -> str:
    """What each stage took in this run (the operator's kondense_stage_duration_seconds)."""
    rows = []
    for plan in runner.plans:
        stage = runner.pipeline.spec.stage(plan.name)
        s = runner.stages[plan.name]
        took = runner.seconds.get(plan.name)
        attempts = f" ({s.attempts} attempts)" if took is not None and s.attempts > 1 else ""
        rows.append((plan.name, f"{stage.kind}/{stage.method}", s.state, "up to date" if took is None else f"{took:.1f}s{attempts}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows)


def format_table(report: Report) -> str:
    """The comparison table: variant, size on disk, parameters, perplexity, KLD and top-1 against
    the baseline, peak runtime memory, decode tokens/s at batch 1 and at the larger batch, and the
    engine that timed it; a variant not evaluated or a number not measured says n/a and why."""
    larger = max((r.batch for r in report.table if r.batch), default=None)
    header = ("variant", "size", "params", "perplexity", "KLD", "top-1", "memory", "decode/s b1",
              f"b{larger}" if larger else "-", "engine")
    rows = [header]
    base = next((r.perplexity for r in report.table if r.variant == report.baseline), None)
    notes = []
    for r in report.table:
        name = r.variant + (" *" if r.variant == report.baseline else "")
        if r.missing:
            rows.append((name, "-", "-", "n/a", "n/a", "n/a", "-", "-", "-", "-"))
            notes.append(f"{r.variant}: not evaluated: {r.missing}")
            continue
        if r.note:
            notes.append(f"{r.variant}: {r.note}")
        ppl = "-" if r.perplexity is None else f"{r.perplexity:.2f}"
        if base and r.perplexity and r.variant != report.baseline:
            ppl += f" ({(r.perplexity / base - 1) * 100:+.2f}%)"
        rows.append(
            (
                name,
                "-" if r.size_bytes is None else human_bytes(r.size_bytes),
                "-" if r.parameters is None else f"{r.parameters / 1e6:.2f}M",
                ppl,
                "n/a" if r.kl_divergence is None else f"{r.kl_divergence:.4f}",
                "n/a" if r.top1_agreement is None else f"{r.top1_agreement * 100:.2f}%",
                "-" if r.memory_bytes is None else human_bytes(r.memory_bytes),
                "-" if r.tokens_per_second is None else f"{r.tokens_per_second:.1f}",
                "-" if r.batch != larger or r.batch_tokens_per_second is None else f"{r.batch_tokens_per_second:.1f}",
                r.engine or "-",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if report.baseline:
        lines.append(f"* baseline for the quality gates, KLD = KL(baseline || variant) per token, top-1 = argmax agrees: {report.baseline}")
    lines += [f"n/a: {n}" for n in notes]
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
