"""runtime.cpu_budget: a pod's CPU limit (a CFS quota) caps the threads a stage starts."""

from __future__ import annotations

import os

import pytest

from kondense_jobs.runtime import cpu_budget

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, AFFINITY),  # no cgroup files: the affinity mask
        ({"cpu.max": "max 100000\n"}, AFFINITY),  # no limit
        ({"cpu.max": "100000 100000\n"}, 1),
        ({"cpu.max": "150000 100000\n"}, min(AFFINITY, 2)),  # 1.5 CPUs: 2 threads
        ({"cpu.max": "50000 100000\n"}, 1),  # below one CPU: still one thread
        ({"cpu.max": "6400000 100000\n"}, AFFINITY),  # a quota above the affinity changes nothing
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, AFFINITY),  # v1, no limit
        ({"cpu.max": "garbage\n"}, AFFINITY),
    ],
)
def test_cpu_budget(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_budget(tmp_path) == expected


def _report_summary(variants: int):
    from kondense.api import Report, ReportRow, Summary, TaskScoreRow

    rows = [
        ReportRow(
            variant=f"variant-{i:02d}", size_bytes=4_444_608 + i, parameters=1_475_200, perplexity=526.5028637124609 + i,
            tokens_per_second=185.32655244807705, kl_divergence=0.00041634825109467286, top1_agreement=0.9781950333131435,
            tasks=[TaskScoreRow(task=f"task-{t}", score=0.725, stderr=0.0714, recovery=0.9655172413793104) for t in range(2)],
            recovery=0.9655172413793104, note="KLD n/a: another vocabulary" if i % 5 == 0 else None,
            memory_bytes=60_620_800 + i, engine="transformers (cpu)", batch=8, batch_tokens_per_second=4073.531228,
        )
        for i in range(variants)
    ]
    metrics = {f"variant-{i:02d}.{k}": 0.123456789 * i for i in range(variants) for k in ("perplexity", "klDivergence", "top1Agreement", "tokensPerSecond")}
    report = Report(uri="file:///store/eval-0123", baseline="variant-00", table=rows, best="variant-03")
    return Summary(state="Succeeded", reason="Succeeded", message="published file:///store/eval-0123", metrics=metrics, report=report)


@pytest.mark.parametrize("variants", [1, 3, 7, 13, 34])
def test_the_termination_message_is_a_whole_summary_within_the_kubelets_limit(variants):
    from kondense.events import parse_summary, summary_line
    from kondense_jobs.__main__ import TERMINATION_LIMIT, _rounded, termination_message

    summary = _report_summary(variants)
    message = termination_message(summary)
    got = parse_summary(message)
    assert len(message.encode()) <= TERMINATION_LIMIT and got is not None, len(message)
    assert (got.state, got.reason, got.message, got.report.uri, got.report.best) == (
        summary.state, summary.reason, summary.message, summary.report.uri, summary.report.best
    )
    if len(summary_line(summary).encode()) <= TERMINATION_LIMIT:  # what fits is kept as it is
        assert got == summary
    elif variants == 7:  # the demo's evaluate: six digits and no metrics (the report's numbers); the rows stay whole
        expected = _rounded(summary.dump())
        expected["metrics"] = {}
        assert got.dump() == expected and got.report.table[0].perplexity == 526.503
    if variants == 13:  # the evaluate stage of benchmarks/quantization_quality.py: its rows stay, metrics go
        assert not got.metrics and [r.variant for r in got.report.table] == [r.variant for r in summary.report.table]
        assert got.report.table[1].perplexity == pytest.approx(527.502864)
