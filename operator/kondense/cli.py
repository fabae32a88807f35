"""The `kondense` command: run, demo, validate, plan, report, crd."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kondense.errors import InvalidSpec, KondenseError

ROOT = Path(__file__).resolve().parents[2]


def _state_dir(args, namespace: str, name: str) -> Path:
    return Path(args.state_dir or Path(".kondense") / namespace / name)


def _run_pipeline(pipeline, args) -> int:
    from kondense.local import LocalRunner, format_durations, format_table

    runner = LocalRunner(pipeline, _state_dir(args, pipeline.metadata.namespace, pipeline.metadata.name), parallel=args.parallel)
    print(f"Pipeline {pipeline.metadata.name}: {len(runner.plans)} stages, artifacts in {pipeline.spec.storage.uri}")
    started = time.monotonic()
    try:
        status = runner.run()
    except KeyboardInterrupt:
        print("\nInterrupted. Run the same command again to resume.", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    ran = ", ".join(runner.executed) or "none (all up to date)"
    forked = f", {len(runner.forked)} forked from a preloaded interpreter" if runner.forked else ""
    print(f"\nStages run: {ran} in {elapsed:.1f}s{forked}. Status: {runner.state_dir / 'status.json'}")
    print(format_durations(runner))
    if status.report:
        print("\n" + format_table(status.report))
        if tasks := format_tasks(status.report):
            print("\n" + tasks)
        print(f"\nReport: {status.report.uri}/report.md, plot: {status.report.uri}/plot.png")
    ready = next(c for c in status.conditions if c.type == "Ready")
    if ready.status != "True":
        print(f"\nPipeline not ready: {ready.reason}: {ready.message}", file=sys.stderr)
        return 1
    return 0


def cmd_run(args) -> int:
    from kondense.store import to_uri
    from kondense.validation import load_file

    pipeline = load_file(Path(args.pipeline))
    if args.store:
        pipeline.spec.storage.uri = to_uri(args.store)
    return _run_pipeline(pipeline, args)


def cmd_demo(args) -> int:
    from kondense import demo
    from kondense.store import to_uri

    base = to_uri(args.base or str(Path.home() / ".cache" / "kondense" / "demo"))
    pipeline = demo.pipeline(base)
    fetching = demo.prefetch_tools(pipeline)  # beside the inputs' build, which is CPU-bound
    inputs = demo.build_inputs(demo.inputs_cache())
    demo.stage_inputs(inputs, base)
    if fetching:
        fetching.join()
    return _run_pipeline(pipeline, args)


def cmd_validate(args) -> int:
    from kondense.validation import load_file

    bad = 0
    for path in args.pipelines:
        try:
            p = load_file(Path(path))
            print(f"{path}: valid ({p.metadata.name}, {len(p.spec.stages)} stages)")
        except InvalidSpec as e:
            print(str(e), file=sys.stderr)
            bad += 1
    return 1 if bad else 0


def cmd_plan(args) -> int:
    from kondense import fit, memory
    from kondense.errors import BY_REASON, Reason
    from kondense.plan import resolve
    from kondense.validation import load_file

    p = load_file(Path(args.pipeline))
    overrides: dict[str, Path] = {}
    for item in args.config or []:
        role, sep, path = item.partition("=")
        if not sep or role not in ("teacher", "student"):
            raise InvalidSpec(f"--config {item!r}: expected teacher=PATH or student=PATH")
        overrides[role] = Path(path)
    gpu_memory = memory.parse_quantity(args.gpu_memory) / memory.GIB if args.gpu_memory else None
    plans = resolve(p.spec, p.metadata.namespace, p.metadata.name)
    sources, origins = {}, {}
    for role in ("teacher", "student"):
        if role in overrides:
            cfg, origins[role] = fit.load_config_file(overrides[role]), str(overrides[role])
        else:
            cfg, origins[role] = fit.read_config(getattr(p.spec, role), p.spec.storage)
        sources[role] = memory.Shape.from_config(cfg, role)
    fits = fit.plan_stages(p.spec, plans, sources, gpu_memory)
    print(f"Plan of {p.metadata.name}" + (f" with {args.gpu_memory} per GPU" if args.gpu_memory else ""))
    print(fit.format_plan(fits, origins))
    if all(f.fits for f in fits):
        return 0
    print(f"\n{Reason.INSUFFICIENT_RESOURCES}: {', '.join(f.name for f in fits if not f.fits)} would not fit.", file=sys.stderr)
    return BY_REASON[Reason.INSUFFICIENT_RESOURCES].exit_code


def cmd_report(args) -> int:
    from kondense.api import Report
    from kondense.local import format_table
    from kondense.plan import resolve
    from kondense.store import join, open_store, to_uri
    from kondense.validation import load_file

    target = args.target
    if Path(target).is_file() and target.endswith((".yaml", ".yml")):
        p = load_file(Path(target))
        evals = [s for s in resolve(p.spec, p.metadata.namespace, p.metadata.name) if s.kind == "evaluate"]
        if not evals:
            raise InvalidSpec(f"{target} has no evaluate stage")
        uri = evals[-1].output
        # A report made without a failed variant (onMissingVariant: skip) has its own address: the
        # local run's status says which, when the report with every variant does not exist.
        status = Path(".kondense") / p.metadata.namespace / p.metadata.name / "status.json"
        if status.is_file() and open_store(uri, max_attempts=2).read_bytes(join(uri, "report.json")) is None:
            report = (json.loads(status.read_text()).get("status") or {}).get("report") or {}
            if report.get("uri", "").startswith(uri.rsplit("-", 1)[0] + "-"):
                uri = report["uri"]
    else:
        uri = to_uri(target)
    raw = open_store(uri, max_attempts=2).read_bytes(join(uri, "report.json"))
    if raw is None:
        raise InvalidSpec(f"{join(uri, 'report.json')} does not exist: has the evaluate stage finished?")
    doc = json.loads(raw)
    report = Report.model_validate({k: v for k, v in doc.items() if k in ("uri", "baseline", "table")})
    print(format_table(report))
    if tasks := format_tasks(report):
        print("\n" + tasks)
    return 0


def format_tasks(report) -> str:
    """The task scores: one column per task (score ± standard error, recovery against the baseline)
    and the mean recovery; a score that is n/a says why below. Empty without tasks."""
    names: list[str] = []
    for row in report.table:
        names += [t.task for t in row.tasks or [] if t.task not in names]
    if not names:
        return ""
    rows = [("variant", *names, "recovery")]
    notes = []
    for r in report.table:
        base = r.variant == report.baseline
        name = r.variant + (" *" if base else "")
        if r.missing:
            rows.append((name, *("n/a" for _ in names), "n/a"))
            continue
        by_task = {t.task: t for t in r.tasks or []}
        cells = []
        for task in names:
            t = by_task.get(task)
            if t is None or t.score is None:
                cells.append("n/a")
            else:
                cell = f"{t.score:.3f}" + (f" ± {t.stderr:.3f}" if t.stderr is not None else "")
                cells.append(cell if base else cell + (f" ({t.recovery * 100:.0f}%)" if t.recovery is not None else " (n/a)"))
            if t is not None and t.note and not r.note:
                notes.append(f"{r.variant}: {t.note}")
        rec = "-" if base else ("n/a" if r.recovery is None else f"{r.recovery * 100:.1f}%")
        rows.append((name, *cells, rec))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"* task scores ± standard error (lm-evaluation-harness); (%) and recovery: score over {report.baseline}'s")
    lines += [f"n/a: {n}" for n in dict.fromkeys(notes)]
    return "\n".join(lines)


def cmd_crd(args) -> int:
    from kondense import generate

    if args.check:
        stale = generate.stale(ROOT)
        for path in stale:
            print(f"{path} is out of date: run `kondense crd`", file=sys.stderr)
        return 1 if stale else 0
    for path in generate.write(ROOT):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kondense", description="Distill, quantize and evaluate LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    def runner_options(p):
        p.add_argument("--parallel", type=int, default=1, help="stages run at once where the DAG allows (default 1)")
        p.add_argument("--state-dir", help="status and logs (default .kondense/<namespace>/<name>)")

    p = sub.add_parser("run", help="run a pipeline's stages as local processes")
    p.add_argument("pipeline", help="CompressionPipeline YAML")
    p.add_argument("--store", help="override spec.storage.uri (a folder or s3://bucket/prefix)")
    runner_options(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("demo", help="the embedded default: a whole pipeline on tiny models built on the spot")
    p.add_argument("--base", help="where inputs and artifacts go: a folder or s3://bucket/prefix (default ~/.cache/kondense/demo)")
    runner_options(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("validate", help="check pipelines as the API server and the planner would")
    p.add_argument("pipelines", nargs="+")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("plan", help="per-GPU memory of every stage from config.json alone: fits or what would (exit 14 if not)")
    p.add_argument("pipeline", help="CompressionPipeline YAML")
    p.add_argument("--gpu-memory", help="memory of one GPU for every stage, e.g. 80Gi (default: resources.gpuMemoryGiB)")
    p.add_argument(
        "--config", action="append", metavar="ROLE=PATH",
        help="read the teacher's or student's config.json from PATH (repeatable)",
    )
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("report", help="print a finished pipeline's comparison table")
    p.add_argument("target", help="pipeline YAML, or the URI of an evaluate stage's artifact")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("crd", help="regenerate the CRD, the chart's copy and the demo example")
    p.add_argument("--check", action="store_true", help="exit 1 when a generated file is out of date")
    p.set_defaults(fn=cmd_crd)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except KondenseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
