"""The evaluate stage's report: report.json (everything), report.md (a table and the gates), plot.png.

evaluate.py measures; this module only shapes and writes what was measured.

report.json's keys are a stable interface (tests/jobs/test_evaluate.py pins them; add keys, never
rename or drop them):

    uri, baseline, setup, table              the summary (`table`: api.ReportRow, one per variant of `of`)
    setup:      seq_length, windows, tokens, prompt_tokens, generate_tokens, kl_top_k, gates,
                tasks[]: name, source, uri, output_type, metric, num_fewshot, limit, examples, samples;
                lm_eval (its version; null without tasks); speed_batches ([1, speedBatch])
    variants[]: variant, format, size_bytes, parameters,
                memory_bytes (peak runtime memory while generating at the larger batch, every
                engine alike; the file size is size_bytes), perplexity,
                tokens_per_second (decode at batch 1),
                kl_divergence, top1_agreement, note, seconds, perplexity_increase,
                tasks[]: task, metric, score, stderr, samples, note, recovery, recovery_note;
                recovery (the mean of the tasks' recoveries; null when one is n/a),
                made_by ("source", "distill logits", "gptq W4A16 g128", "gguf q4_k_m + imatrix"),
                loads_in (the engines that load it), fallback_tensors (gguf: tensors llama.cpp
                quantized with a 32-block type because their rows do not divide 256; else null),
                engine ("transformers (cpu)", "llama.cpp (cuda, all layers)": what timed it),
                speed[]: batch, prefill_tokens_per_second, decode_tokens_per_second,
                memory_note (why memory_bytes is null, or what it includes besides generating)
    missing[]:  variant, reason              variants `of` names that were not evaluated, and why
    gate:       passed, message, checks[]: variant, gate, value, limit, passed (null: n/a), text,
                task (minRecovery: the task, or "mean"; else null)

Numbers that could not be measured are null, and `note` says why.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kondense.api import Report, ReportRow, TaskScoreRow

MIB = 1024 * 1024


@dataclass
class Measurement:
    """One variant, measured."""

    variant: str
    format: str  # hf | gguf
    size_bytes: int | None  # weight files on disk
    parameters: int | None
    memory_bytes: int | None  # peak runtime memory while generating at the larger batch (kondense_jobs.speed)
    perplexity: float | None
    tokens_per_second: float | None  # decode at batch 1
    # KL(baseline || variant) per predicted token, mean nats; the share of tokens whose argmax agrees
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    note: str | None = None  # why a number is n/a
    seconds: float = 0.0  # wall time spent measuring it
    tasks: list = field(default_factory=list)  # kondense_jobs.tasks.TaskScore, in evaluate.tasks order
    made_by: str | None = None  # "source", "distill logits", "gptq W4A16 g128", "gguf q4_k_m + imatrix"
    loads_in: str | None = None  # the engines that load it
    fallback_tensors: int | None = None  # gguf: tensors quantized with a 32-block type (rows not of 256)
    engine: str | None = None  # what timed it: "transformers (cpu)", "llama.cpp (cuda, all layers)"
    speed: list[dict] = field(default_factory=list)  # kondense_jobs.speed.Timing as dicts, batch 1 first
    memory_note: str | None = None

    def row(self, base: Measurement | None = None) -> ReportRow:
        per_task, overall = recoveries(self, base) if base is not None else ({}, None)
        task_rows = [
            TaskScoreRow(
                task=t.task, score=finite(t.score), stderr=finite(t.stderr), recovery=per_task.get(t.task, (None, None))[0],
                note=t.note or per_task.get(t.task, (None, None))[1],
            )
            for t in self.tasks
        ]
        return ReportRow(
            tasks=task_rows or None,
            recovery=overall,
            variant=self.variant,
            size_bytes=self.size_bytes,
            parameters=self.parameters,
            perplexity=finite(self.perplexity),
            tokens_per_second=finite(self.tokens_per_second),
            kl_divergence=finite(self.kl_divergence),
            top1_agreement=finite(self.top1_agreement),
            note=self.note,
            memory_bytes=self.memory_bytes,
            engine=self.engine,
            batch=self.speed[-1]["batch"] if len(self.speed) > 1 else None,
            batch_tokens_per_second=finite(self.speed[-1]["decode_tokens_per_second"]) if len(self.speed) > 1 else None,
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
    task: str | None = None  # minRecovery: the task, or "mean"


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


def recoveries(m: Measurement, base: Measurement) -> tuple[dict[str, tuple[float | None, str | None]], float | None]:
    """Per task (recovery, why it is n/a): the variant's score over the baseline's; and their mean
    (None when a task's is n/a or there are no tasks)."""
    theirs = {t.task: t for t in base.tasks}
    out: dict[str, tuple[float | None, str | None]] = {}
    for t in m.tasks:
        b = theirs.get(t.task)
        if finite(t.score) is None:
            out[t.task] = (None, t.note or f"{t.task}: no score")
        elif b is None or finite(b.score) is None:
            why = b.note if b is not None and b.note else "not scored"
            out[t.task] = (None, f"{t.task}: the baseline {base.variant}'s score is n/a ({why})")
        elif b.score == 0:
            out[t.task] = (None, f"{t.task}: the baseline {base.variant} scores 0, so a ratio to it is undefined")
        else:
            out[t.task] = (t.score / b.score, None)
    values = [r for r, _ in out.values()]
    overall = sum(values) / len(values) if values and all(r is not None for r in values) else None
    return out, overall


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
    base_m = next((m for m in measurements if m.variant == report.baseline), None)
    base = base_m.perplexity if base_m else None
    variants = []
    for m in measurements:
        later = ("tasks", "made_by", "loads_in", "fallback_tensors", "engine", "speed", "memory_note")  # added since
        doc = {k: (finite(v) if isinstance(v, float) else v) for k, v in asdict(m).items() if k not in later}
        doc["perplexity_increase"] = relative_increase(m.perplexity, base)
        per_task, overall = recoveries(m, base_m) if base_m else ({}, None)
        doc["tasks"] = [
            {
                **{k: (finite(v) if isinstance(v, float) else v) for k, v in t.dump().items()},
                "recovery": per_task.get(t.task, (None, None))[0],
                "recovery_note": per_task.get(t.task, (None, None))[1],
            }
            for t in m.tasks
        ]
        doc["recovery"] = overall
        doc |= {"made_by": m.made_by, "loads_in": m.loads_in, "fallback_tensors": m.fallback_tensors}
        doc |= {
            "engine": m.engine,
            "speed": [{k: finite(v) if isinstance(v, float) else v for k, v in t.items()} for t in m.speed],
            "memory_note": m.memory_note,
        }
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
        f"({setup['tokens']} tokens, identical for every variant). "
        f"KLD: mean KL(baseline || variant) of the next-token distributions, in nats per token; "
        f"top-1: share of tokens where the variant's most likely next token is the baseline's. "
        f"Peak memory and decode tokens/s: see Speed and memory.",
        "",
        "| variant | format | size on disk | parameters | peak memory | perplexity | vs baseline | KLD | top-1 | decode tokens/s |",
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
    lines += ["", "| variant | made by | loads in |", "|---|---|---|"]
    lines += [f"| {v['variant']} | {v['made_by'] or '-'} | {v['loads_in'] or '-'} |" for v in doc["variants"]]
    fallbacks = [
        f"- {v['variant']}: {v['fallback_tensors']} tensors' rows do not divide the type's 256-block; llama.cpp "
        "quantized them with a 32-block type instead (q4_k -> q5_0, q6_k -> q8_0, q2_k/q3_k -> q4_0, iq4_xs -> iq4_nl)"
        for v in doc["variants"] if v["fallback_tensors"]
    ]
    if fallbacks:
        lines += ["", "Fallback quantization:", "", *fallbacks]
    lines += speed_table(doc)
    lines += task_table(doc)
    notes += [
        f"- {v['variant']}: {t['note'] or t['recovery_note']}"
        for v in doc["variants"] for t in v["tasks"] if (t["note"] or t["recovery_note"]) and v["note"] is None
    ]
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


def speed_table(doc: dict[str, Any]) -> list[str]:
    """Prefill and decode tokens/s at each batch size, the engine that timed each row, peak memory and size."""
    setup = doc["setup"]
    batches = setup.get("speed_batches") or [1]
    lines = [
        "",
        "## Speed and memory",
        "",
        f"Every variant generated {setup['generate_tokens']} tokens greedily per sequence after the same "
        f"{setup['prompt_tokens']}-token prompts (token ids from the held-out split), at batch "
        + " and ".join(str(b) for b in batches)
        + ", once untimed, then timed. Prefill: prompt tokens/s of the pass that yields the first new token; "
        "decode: tokens/s of the steps after it. Peak memory: the most the loaded variant held while generating at "
        f"batch {batches[-1]}, above the process before loading (resident memory on a CPU, allocated memory on a "
        "GPU), the same for every engine; size on disk is its files.",
        "",
        "| variant | engine | " + " | ".join(f"prefill b{b} | decode b{b}" for b in batches) + " | peak memory | size on disk |",
        "|---|---|" + "--:|" * (2 * len(batches) + 2),
    ]
    for v in doc["variants"]:
        by_batch = {t["batch"]: t for t in v.get("speed") or []}
        cells = []
        for b in batches:
            t = by_batch.get(b, {})
            cells += [_num(t.get("prefill_tokens_per_second"), ",.0f"), _num(t.get("decode_tokens_per_second"), ",.1f")]
        lines.append(
            f"| {v['variant']} | {v.get('engine') or '-'} | " + " | ".join(cells)
            + f" | {human_bytes(v['memory_bytes'])} | {human_bytes(v['size_bytes'])} |"
        )
    notes = [f"- {v['variant']}: {v['memory_note']}" for v in doc["variants"] if v.get("memory_note")]
    return lines + (["", *notes] if notes else [])


def score_cell(t: dict[str, Any], baseline: bool) -> str:
    if t["score"] is None:
        return "n/a"
    cell = f"{t['score']:.4f}" + (f" ± {t['stderr']:.4f}" if t["stderr"] is not None else "")
    if not baseline:
        cell += " (n/a)" if t["recovery"] is None else f" ({t['recovery'] * 100:.1f}%)"
    return cell


def task_table(doc: dict[str, Any]) -> list[str]:
    """The tasks: one column per task (score ± standard error, and the recovery against the baseline), the mean recovery."""
    tasks = doc["setup"].get("tasks") or []
    if not tasks:
        return []
    described = "; ".join(
        f"{t['name']} ({t['output_type']}, {t['metric'].split(',')[0]}, {t['num_fewshot']}-shot, {t['samples']} examples)"
        for t in tasks
    )
    lines = [
        "",
        "## Tasks",
        "",
        f"lm-evaluation-harness {doc['setup'].get('lm_eval')}: {described}. Each cell: score ± standard error "
        f"(recovery: the score over the baseline {doc['baseline']}'s); recovery: the mean over the tasks.",
        "",
        "| variant | " + " | ".join(t["name"] for t in tasks) + " | recovery |",
        "|---|" + "--:|" * (len(tasks) + 1),
    ]
    for v in doc["variants"]:
        is_base = v["variant"] == doc["baseline"]
        by_task = {t["task"]: t for t in v["tasks"]}
        cells = [score_cell(by_task[t["name"]], is_base) if t["name"] in by_task else "n/a" for t in tasks]
        rec = "-" if is_base else ("n/a" if v["recovery"] is None else f"{v['recovery'] * 100:.1f}%")
        name = f"{v['variant']} (baseline)" if is_base else v["variant"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rec} |")
    for m in doc["missing"]:
        lines.append(f"| {m['variant']} | " + " | ".join("n/a" for _ in tasks) + " | n/a |")
    return lines


# Where a point's label may go, in points from the point, in order of preference: right or left of
# it, level, below, above, then further away (ha: the label's horizontal alignment).
LABEL_SPOTS = [(dx, dy, "left" if dx > 0 else "right") for dy in (4, -12, 16, -24, 28, -36, 40, -48) for dx in (6, -6)]


def plot(doc: dict[str, Any], path: Path) -> list[list[tuple[str, Any]]]:
    """Size on disk (MiB) against perplexity, KL divergence from the baseline and (with tasks) the
    mean task recovery: one labelled point per variant in each panel. Labels of points that sit
    close (nf4 and gptq often do) are moved apart so that none overlaps another. Returns each
    panel's labels with their extents in the saved figure's pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("perplexity", "perplexity (held-out)"), ("kl_divergence", "KLD from the baseline (nats/token)")]
    if doc["setup"].get("tasks"):
        panels.append(("recovery", "task recovery (mean of score / baseline's)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), dpi=120, squeeze=False)
    labelled = []
    for ax, (key, label) in zip(axes[0], panels):
        points = [
            (v["variant"], v["size_bytes"] / MIB, v[key])
            for v in doc["variants"]
            if v[key] is not None and v["size_bytes"] is not None and (key == "perplexity" or v["variant"] != doc["baseline"])
        ]
        for name, size, value in points:
            baseline = name == doc["baseline"]
            style = {"s": 80, "marker": "*", "color": "tab:red"} if baseline else {"s": 40, "marker": "o", "color": "tab:blue"}
            ax.scatter([size], [value], **style)
        values = [p for _, _, p in points]
        if key == "perplexity" and values and max(values) / max(min(values), 1e-9) > 5:
            ax.set_yscale("log")
        if key == "recovery" and values:
            ax.axhline(1.0, color="tab:red", alpha=0.4, linestyle="--")
        ax.set_xlabel("size on disk (MiB)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        labelled.append((ax, points))
    axes[0][0].set_title(f"Size vs quality (baseline: {doc['baseline']})")
    fig.tight_layout()
    fig.canvas.draw()  # the final layout: labels are placed in its pixels
    extents = [_place_labels(ax, points, fig.canvas.get_renderer()) for ax, points in labelled]
    fig.savefig(path)
    plt.close(fig)
    return extents


def _place_labels(ax, points: list[tuple[str, float, float]], renderer) -> list[tuple[str, Any]]:
    """Annotate each point at the first of LABEL_SPOTS where its label overlaps no label placed before
    nor a point, and stays inside the panel (points from left to right, bottom to top); where none
    is free, the least crowded."""
    from matplotlib.transforms import Bbox

    placed: list[tuple[str, Any]] = []
    frame = ax.get_window_extent(renderer)
    order = sorted(points, key=lambda p: tuple(ax.transData.transform((p[1], p[2]))))
    markers = [Bbox.from_bounds(px - 5, py - 5, 10, 10) for px, py in (ax.transData.transform((x, y)) for _, x, y in order)]
    for name, x, y in order:
        text = ax.annotate(name, (x, y), textcoords="offset points", xytext=LABEL_SPOTS[0][:2], fontsize=9)
        best = None
        for dx, dy, ha in LABEL_SPOTS:
            text.xyann, _ = (dx, dy), text.set_horizontalalignment(ha)
            box = text.get_window_extent(renderer)
            crowd = (
                sum(box.overlaps(b) for _, b in placed)
                + sum(box.overlaps(m) for m in markers) / 2  # another point's marker hidden: half as bad
                + (not (frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)))
            )
            if best is None or crowd < best[0]:
                best = (crowd, dx, dy, ha, box)
            if crowd == 0:
                break
        _, dx, dy, ha, box = best
        text.xyann, _ = (dx, dy), text.set_horizontalalignment(ha)
        placed.append((name, box))
    return placed
