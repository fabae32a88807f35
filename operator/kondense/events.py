"""Structured lines on a stage's stdout: progress while it runs, the summary when it ends.

One JSON object per line with a "kondense" key, so the local runner (reading the pipe) and
the operator (reading the termination message) parse the same format. Everything else on
stdout/stderr is ordinary log text.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from kondense.api import Summary

KEY = "kondense"


def format_line(event: str, **fields: Any) -> str:
    return json.dumps({KEY: event, **{k: v for k, v in fields.items() if v is not None}}, separators=(",", ":"))


def parse_line(line: str) -> dict[str, Any] | None:
    """The event of a structured line, or None for ordinary log text."""
    line = line.strip()
    if not line.startswith("{") or f'"{KEY}"' not in line:
        return None
    try:
        doc = json.loads(line)
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) and KEY in doc else None


class Progress:
    """Emits `{"kondense":"progress","step":..,"total":..,"etaSeconds":..}` lines, rate-limited."""

    def __init__(self, stage: str, out: TextIO | None = None, min_interval: float = 1.0):
        self.stage = stage
        self.out = out or sys.stdout
        self.min_interval = min_interval
        self._start = time.monotonic()
        self._last = 0.0
        self._first_step: int | None = None

    def reset_clock(self, step: int = 0) -> None:
        """Start the ETA clock now (e.g. after resuming at `step`)."""
        self._start = time.monotonic()
        self._first_step = step

    def update(self, step: int, total: int, *, phase: str | None = None, force: bool = False, **metrics: float) -> None:
        now = time.monotonic()
        if not force and step < total and now - self._last < self.min_interval:
            return
        self._last = now
        if self._first_step is None:
            self._first_step = 0
        done = step - self._first_step
        elapsed = now - self._start
        eta = elapsed / done * (total - step) if done > 0 else None
        rounded = {k: round(float(v), 5) for k, v in metrics.items() if v is not None}
        print(
            format_line(
                "progress",
                stage=self.stage,
                phase=phase,
                step=step,
                total=total,
                etaSeconds=round(eta, 1) if eta is not None else None,
                **rounded,
            ),
            file=self.out,
            flush=True,
        )


def summary_line(summary: Summary) -> str:
    return format_line("summary", **summary.dump())


def parse_summary(text: str) -> Summary | None:
    """The summary in a termination message or a log: the last structured summary line."""
    for line in reversed(text.strip().splitlines()):
        doc = parse_line(line)
        if doc and doc[KEY] == "summary":
            doc.pop(KEY)
            try:
                return Summary.model_validate(doc)
            except ValueError:
                return None
    return None


def last_progress(text: str) -> dict[str, Any] | None:
    """The newest progress event in a log (or its tail), or None."""
    for line in reversed(text.strip().splitlines()):
        doc = parse_line(line)
        if doc and doc[KEY] == "progress":
            return doc
    return None


def describe(progress: dict[str, Any]) -> str:
    """'120/500 steps, ETA 1:05' for status.progress and the progress bars."""
    phase = progress.get("phase") or "steps"
    text = f"{progress.get('step', 0)}/{progress.get('total', '?')} {phase}"
    eta = progress.get("etaSeconds")
    if eta is not None and progress.get("step") != progress.get("total"):
        text += f", ETA {int(eta) // 60}:{int(eta) % 60:02d}"
    return text
