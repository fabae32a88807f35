"""Prometheus metrics of the operator: what it runs, how long stages take, why they fail, what
the API server refused, and how long reconciles take.

Every replica serves /metrics and /readyz (`serve`), the leader and the standbys alike; a
standby's counters stay at zero and `kondense_leader` is 0. Stage durations and failures are
counted when a stage's status turns Succeeded or Failed in a status the operator writes
(`stage_transitions`): a restarted or newly elected operator reads the stored status first and
counts nothing twice. Pipelines by phase are read from the operator's index at scrape time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kondense import api

log = logging.getLogger("kondense.metrics")

METRICS_PATH, READY_PATH = "/metrics", "/readyz"
PHASES = ("Pending", "Running", "Succeeded", "Failed")
# Stages run from seconds (a tiny evaluate) to days (a 70B distillation).
STAGE_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600, 48 * 3600, 96 * 3600)

STAGE_DURATION = Histogram(
    "kondense_stage_duration_seconds",
    "Time from a stage's start to its end, by stage kind, method and final state.",
    ("kind", "method", "state"),
    buckets=STAGE_BUCKETS,
)
STAGE_FAILURES = Counter(
    "kondense_stage_failures_total", "Stages that failed, by kind and reason (OOMKilled, InvalidSpec, ...).", ("kind", "reason")
)
JOBS_CREATED = Counter(
    "kondense_jobs_created_total", "Jobs the operator created, by component: stage or cleanup.", ("component",)
)
JOBS_DELETED = Counter("kondense_jobs_deleted_total", "Jobs the operator deleted (superseded, timed out, rebuilt, stopped).")
RECONCILE_DURATION = Histogram(
    "kondense_reconcile_duration_seconds",
    "Time to reconcile one pipeline: plan, observe its Jobs, create or delete, write status; by result.",
    ("result",),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
API_ERRORS = Counter(
    "kondense_api_errors_total",
    "Kubernetes API requests of the operator that failed, by HTTP status (0: no answer), retries included.",
    ("code",),
)
PROGRESS_POLLS = Counter(
    "kondense_progress_polls_total", "Log tails read for a running stage's progress, by result (ok, empty, error).", ("result",)
)
LEADER = Gauge("kondense_leader", "1 on the replica that holds the leader Lease (or runs without election), else 0.")


class Pipelines(Collector):
    """kondense_pipelines{phase}: the pipelines the operator sees, read from its index when scraped."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[dict]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("kondense_pipelines", "Pipelines the operator watches, by phase.", labels=("phase",))
        counts = dict.fromkeys(PHASES, 0)
        for body in list(self.source() if self.source is not None else []):
            counts[phase(body.get("status") or {})] += 1
        for name, count in counts.items():
            family.add_metric((name,), count)
        yield family


PIPELINES = Pipelines()
REGISTRY.register(PIPELINES)


def phase(status: dict) -> str:
    """Failed, Succeeded, Running or Pending, from a pipeline's stored status."""
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    if conditions.get("Failed") == "True":
        return "Failed"
    if conditions.get("Succeeded") == "True":
        return "Succeeded"
    if any(s.get("state") == "Running" for s in status.get("stages") or []):
        return "Running"
    return "Pending"


def stage_kind_and_method(spec: dict, name: str) -> tuple[str, str]:
    """A stage's kind and method from the pipeline's spec (the default method when unset)."""
    for stage in spec.get("stages") or []:
        if stage.get("name") == name:
            try:
                parsed = api.Stage.model_validate(stage)
            except ValueError:  # an invalid stage never ran
                break
            return parsed.kind, parsed.method
    return "unknown", "unknown"


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        begin, finish = (datetime.fromisoformat(t.replace("Z", "+00:00")) for t in (start, end))
    except ValueError:
        return None
    return max((finish - begin).total_seconds(), 0.0)


def stage_transitions(spec: dict, before: dict | None, after: dict) -> None:
    """Count the stages that `after` (a status about to be written) shows Succeeded or Failed and
    `before` (the stored one) did not."""
    previous = {s.get("name"): s.get("state") for s in (before or {}).get("stages") or []}
    for stage in after.get("stages") or []:
        state, name = stage.get("state"), stage.get("name")
        if state not in ("Succeeded", "Failed") or previous.get(name) == state:
            continue
        kind, method = stage_kind_and_method(spec, name)
        if state == "Failed":
            STAGE_FAILURES.labels(kind, stage.get("reason") or "Error").inc()
        seconds = _seconds(stage.get("startedAt"), stage.get("finishedAt"))
        if seconds is not None:
            STAGE_DURATION.labels(kind, method, state).observe(seconds)


class _Handler(BaseHTTPRequestHandler):
    ready: Callable[[], tuple[bool, str]] = staticmethod(lambda: (True, "ok"))

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == METRICS_PATH:
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == READY_PATH:
            ok, why = self.ready()
            self._send(200 if ok else 503, f"{why}\n".encode(), "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found: /metrics or /readyz\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes every 30 s are not news
        log.debug(format, *args)


def serve(host: str, port: int, ready: Callable[[], tuple[bool, str]]) -> ThreadingHTTPServer:
    """Serve /metrics and /readyz on a thread; `ready()` says whether this replica can work and why."""
    handler = type("Handler", (_Handler,), {"ready": staticmethod(ready)})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise SystemExit(
            f"cannot serve metrics on {host}:{port}: {e.strerror}. Set KONDENSE_METRICS_PORT (chart: metrics.port) "
            "to a free port, other than the liveness port."
        ) from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("Metrics on http://%s:%d%s, readiness on %s", host, server.server_address[1], METRICS_PATH, READY_PATH)
    return server
