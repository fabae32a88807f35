"""The evaluate stage's report: report.json (everything), report.md (a table and the gates), plot.png.

evaluate.py measures; this module only shapes and writes what was measured.

report.json's keys are a stable interface (tests/jobs/test_evaluate.py pins them; add keys, never
rename or drop them):

    uri, baseline, setup, table              the summary (`table`: api.ReportRow, one per variant of `of`)
    variants[]: variant, format, size_bytes, parameters, memory_bytes, perplexity, tokens_per_second,
                kl_divergence, top1_agreement, note, seconds, perplexity_increase
    missing[]:  variant, reason              variants `of` names that were not evaluated, and why
    gate:       passed, message, checks[]: variant, gate, value, limit, passed (null: n/a), text

Numbers that could not be measured are null, and `note` says why.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kondense.api import Report, ReportRow

MIB = 1024 * 1024


@dataclass
class Measurement:
    """One variant, measured."""

    variant: str
    format: str  # hf | gguf
    size_bytes: int | None  # weight files on disk
    parameters: int | None
    memory_bytes: int | None  # get_memory_footprint() for HF, the file size for GGUF
    perplexity: float | None
    tokens_per_second: float | None
    # KL(baseline || variant) per predicted token, mean nats; the share of tokens whose argmax agrees
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    note: str | None = None  # why a number is n/a
    seconds: float = 0.0  # wall time spent measuring it

    def row(self) -> ReportRow:
        return ReportRow(
            variant=self.variant,
            size_bytes=self.size_bytes,
            parameters=self.parameters,
            perplexity=finite(self.perplexity),
            tokens_per_second=finite(self.tokens_per_second),
            kl_divergence=finite(self.kl_divergence),
            top1_agreement=finite(self.top1_agreement),
            note=self.note,
        )


@dataclass
class Check:
    """One gate applied to one variant."""

    variant: str
    gate: str  # maxPerplexityIncrease | minTokensPerSecond | maxKLDivergence | minTop1Agreement | missing
    value: float | None
    limit: float | None
    passed: bool | None  # None: n/a, the variant was not evaluated (onMissingVariant: skip)
    text: str


@dataclass
class GateResult:
    passed: bool
    message: str
    checks: list[Check] = field(default_factory=list)

    def dump(self) -> dict[str, Any]:
        return {"passed": self.passed, "message": self.message}


SOURCES = ("teacher", "student")  # inputs measured for comparison, not variants one would serve


def best_variant(measurements: list[Measurement], gate: GateResult, baseline: str) -> tuple[str, float, str] | None:
    """(variant, size ratio, reference): the smallest variant that passed every gate applied to
    it (lower perplexity breaks a tie), and its size over the teacher's, or over the baseline's
    when the teacher was not measured. None when no variant passed."""
    failed = {c.variant for c in gate.checks if c.passed is False}
    candidates = [
        m for m in measurements if m.variant not in SOURCES and m.variant not in failed and m.size_bytes is not None
    ]
    if not candidates:
        return None
    best = min(candidates, key=lambda m: (m.size_bytes, finite(m.perplexity) or math.inf))
    sizes = {m.variant: m.size_bytes for m in measurements}
    reference = "teacher" if "teacher" in sizes else baseline
    if not sizes.get(reference):
        return None
    return best.variant, round(best.size_bytes / sizes[reference], 4), reference


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def relative_increase(value: float | None, base: float | None) -> float | None:
    if finite(value) is None or finite(base) is None or base == 0:
        return None
    return value / base - 1


def document(
    report: Report, measurements: list[Measurement], gate: GateResult, setup: dict[str, Any],
    missing: dict[str, str] | None = None,
) -> dict:
    """The report.json document: the summary table plus every measurement, what is missing, the setup and the gates."""
    base = next((m.perplexity for m in measurements if m.variant == report.baseline), None)
    variants = []
    for m in measurements:
        doc = {k: (finite(v) if isinstance(v, float) else v) for k, v in asdict(m).items()}
        doc["perplexity_increase"] = relative_increase(m.perplexity, base)
        variants.append(doc)
    return {
        "uri": report.uri,
        "baseline": report.baseline,
        "setup": setup,
        "variants": variants,
        "missing": [{"variant": name, "reason": reason} for name, reason in (missing or {}).items()],
        "gate": {**gate.dump(), "checks": [asdict(c) for c in gate.checks]},
        "table": report.dump()["table"],
    }


def write(
    out_dir: Path, report: Report, measurements: list[Measurement], gate: GateResult, setup: dict,
    missing: dict[str, str] | None = None,
) -> list[Path]:
    doc = document(report, measurements, gate, setup, missing)
    paths = [out_dir / "report.json", out_dir / "report.md", out_dir / "plot.png"]
    paths[0].write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    paths[1].write_text(markdown(doc))
    plot(doc, paths[2])
    return paths


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(doc: dict[str, Any]) -> str:
    setup = doc["setup"]
    lines = [
        "# Evaluation report",
        "",
        f"Perplexity on {setup['windows']} held-out windows of {setup['seq_length']} tokens "
        f"({setup['tokens']} tokens, identical for every variant); throughput: greedy generation of "
        f"{setup['generate_tokens']} new tokens after a {setup['prompt_tokens']}-token prompt. "
        f"KLD: mean KL(baseline || variant) of the next-token distributions, in nats per token; "
        f"top-1: share of tokens where the variant's most likely next token is the baseline's.",
        "",
        "| variant | format | size on disk | parameters | memory | perplexity | vs baseline | KLD | top-1 | tokens/s |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for v in doc["variants"]:
        name = f"{v['variant']} (baseline)" if v["variant"] == doc["baseline"] else v["variant"]
        inc = v["perplexity_increase"]
        params = "-" if v["parameters"] is None else f"{v['parameters'] / 1e6:.2f}M"
        vs = "-" if inc is None or v["variant"] == doc["baseline"] else f"{inc * 100:+.2f}%"
        lines.append(
            f"| {name} | {v['format']} | {human_bytes(v['size_bytes'])} | {params} | "
            f"{human_bytes(v['memory_bytes'])} | "
            f"{_num(v['perplexity'], '.2f')} | {vs} | {_num(v['kl_divergence'], '.4f')} | "
            f"{_num(None if v['top1_agreement'] is None else v['top1_agreement'] * 100, '.2f')}{'' if v['top1_agreement'] is None else '%'} | "
            f"{_num(v['tokens_per_second'], '.1f')} |"
        )
    for m in doc["missing"]:
        lines.append(f"| {m['variant']} | not evaluated | - | - | - | n/a | - | n/a | n/a | - |")
    notes = [f"- {v['variant']}: {v['note']}" for v in doc["variants"] if v["note"]]
    notes += [f"- {m['variant']}: not evaluated: {m['reason']}" for m in doc["missing"]]
    if notes:
        lines += ["", "n/a:", "", *notes]
    gate = doc["gate"]
    lines += ["", "## Quality gates", ""]
    if not gate["checks"]:
        lines.append("No quality gates set.")
    else:
        lines.append(f"**{'Passed' if gate['passed'] else 'Failed'}**: {gate['message']}")
        lines.append("")
        mark = {True: "PASS", False: "FAIL", None: "N/A"}
        lines += [f"- {mark[c['passed']]} {c['text']}" for c in gate["checks"]]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    """Size on disk (MiB) against perplexity, one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(v["variant"], v["size_bytes"] / MIB, v["perplexity"]) for v in doc["variants"] if v["perplexity"]]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, size, ppl in points:
        baseline = name == doc["baseline"]
        style = {"s": 80, "marker": "*", "color": "tab:red"} if baseline else {"s": 40, "marker": "o", "color": "tab:blue"}
        ax.scatter([size], [ppl], **style)
        ax.annotate(name, (size, ppl), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ppls = [p for _, _, p in points]
    if ppls and max(ppls) / max(min(ppls), 1e-9) > 5:
        ax.set_yscale("log")
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(f"Size vs perplexity (baseline: {doc['baseline']})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
