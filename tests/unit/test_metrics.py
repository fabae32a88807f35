"""The operator's metrics: what moves them, and the endpoint that serves them."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from kubernetes import client
from prometheus_client import REGISTRY

from kondense import handlers, metrics, operator
from kondense.errors import ApiRejected
from kondense.kube import Kube
from kondense.leader import LeaderElector
from kondense.settings import Election

SPEC = {"stages": [
    {"name": "distill", "distill": {}},  # method left to its default
    {"name": "nf4", "quantize": {"method": "bnb-nf4"}},
    {"name": "eval", "evaluate": {"of": ["distill", "nf4"]}},
]}


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def stage(name: str, state: str, reason: str | None = None, start="2026-12-01T10:00:00Z", end="2026-12-01T10:05:00Z"):
    return {"name": name, "state": state, "reason": reason, "startedAt": start, "finishedAt": end if state != "Running" else None}


def test_a_stage_that_ends_is_counted_once_with_its_kind_method_and_duration():
    running = {"stages": [stage("distill", "Running"), stage("nf4", "Pending")]}
    done = {"stages": [stage("distill", "Succeeded"), stage("nf4", "Pending")]}
    count = ("kondense_stage_duration_seconds_count", {"kind": "distill", "method": "logits", "state": "Succeeded"})
    total = ("kondense_stage_duration_seconds_sum", {"kind": "distill", "method": "logits", "state": "Succeeded"})
    before, seconds = value(count[0], **count[1]), value(total[0], **total[1])
    metrics.stage_transitions(SPEC, running, done)
    metrics.stage_transitions(SPEC, done, done)  # written again (progress, a report): not a new end
    assert value(count[0], **count[1]) == before + 1
    assert value(total[0], **total[1]) == pytest.approx(seconds + 300)


def test_a_failed_stage_is_counted_by_reason_and_a_restarted_operator_counts_nothing_twice():
    failed = {"stages": [stage("distill", "Succeeded"), stage("nf4", "Failed", "OOMKilled")]}
    before = value("kondense_stage_failures_total", kind="quantize", reason="OOMKilled")
    durations = value("kondense_stage_duration_seconds_count", kind="quantize", method="bnb-nf4", state="Failed")
    metrics.stage_transitions(SPEC, {"stages": [stage("distill", "Succeeded"), stage("nf4", "Running")]}, failed)
    metrics.stage_transitions(SPEC, failed, failed)  # a new leader reads the stored status first
    assert value("kondense_stage_failures_total", kind="quantize", reason="OOMKilled") == before + 1
    assert value("kondense_stage_duration_seconds_count", kind="quantize", method="bnb-nf4", state="Failed") == durations + 1


@pytest.mark.parametrize(
    "status, phase",
    [
        ({}, "Pending"),
        ({"stages": [stage("distill", "Running")]}, "Running"),
        ({"conditions": [{"type": "Failed", "status": "True"}], "stages": [stage("distill", "Running")]}, "Failed"),
        ({"conditions": [{"type": "Failed", "status": "False"}, {"type": "Succeeded", "status": "True"}]}, "Succeeded"),
    ],
    ids=["new", "running", "failed-while-another-runs", "succeeded"],
)
def test_phase(status, phase):
    assert metrics.phase(status) == phase


def test_pipelines_by_phase_are_read_from_the_index_when_scraped():
    index = [{"status": {}}, {"status": {"stages": [stage("d", "Running")]}}, {"status": {"stages": [stage("d", "Running")]}}]
    metrics.PIPELINES.source = lambda: index
    try:
        assert value("kondense_pipelines", phase="Running") == 2
        assert value("kondense_pipelines", phase="Pending") == 1
        index.pop()
        assert value("kondense_pipelines", phase="Running") == 1
        assert value("kondense_pipelines", phase="Failed") == 0
    finally:
        metrics.PIPELINES.source = None


def test_api_errors_are_counted_by_status_code_including_each_retry():
    """No API server listens on the port: every attempt is a request that got no answer (code 0)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = client.Configuration(host=f"http://127.0.0.1:{port}")
    config.retries = False
    kube = Kube(client.ApiClient(config), attempts=3, backoff=0.01)
    before = value("kondense_api_errors_total", code="0")
    with pytest.raises(ApiRejected):
        kube.patch_status("ns", "p", {"progress": "1/2"})
    assert value("kondense_api_errors_total", code="0") == before + 3


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_endpoint_serves_the_metrics_and_says_why_it_is_not_ready():
    state = {"ready": (False, "standby: cannot reach the Lease kondense-system/kondense: 403 Forbidden")}
    server = metrics.serve("127.0.0.1", 0, lambda: state["ready"])
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, text = get(f"{base}/metrics")
        assert code == 200
        for name in ("kondense_stage_duration_seconds", "kondense_jobs_created_total", "kondense_reconcile_duration_seconds",
                     "kondense_api_errors_total", "kondense_progress_polls_total", "kondense_pipelines", "kondense_leader"):
            assert f"# TYPE {name} " in text, name
        assert get(f"{base}/readyz") == (503, "standby: cannot reach the Lease kondense-system/kondense: 403 Forbidden\n")
        state["ready"] = (True, "leading: the operator runs")
        assert get(f"{base}/readyz") == (200, "leading: the operator runs\n")
        assert get(f"{base}/other")[0] == 404
        with pytest.raises(SystemExit, match=rf"cannot serve metrics on 127.0.0.1:{server.server_address[1]}: .*"
                                             r"Set KONDENSE_METRICS_PORT"):
            metrics.serve("127.0.0.1", server.server_address[1], lambda: state["ready"])  # the port is taken
    finally:
        server.shutdown()
        server.server_close()


def test_a_standby_is_ready_while_it_reaches_its_lease_and_not_when_it_cannot(monkeypatch):
    monkeypatch.setattr(handlers, "_INDEXES", None)  # kopf has not started in this process (another test may have)
    election = Election(lease="kondense", namespace="kondense-system", identity="op-b")
    elector = LeaderElector(None, election, on_started=lambda: None, on_lost=lambda _: None)  # type: ignore[arg-type]
    assert operator.readiness(elector) == (False, "standby: has not read the Lease kondense-system/kondense yet")
    elector._remember({"metadata": {"resourceVersion": "7"}, "spec": {"holderIdentity": "op-a"}})
    assert operator.readiness(elector) == (True, "standby: the Lease kondense-system/kondense is held by op-a")
    elector._complain("403 Forbidden: leases is forbidden")
    ok, why = operator.readiness(elector)
    assert not ok and "cannot reach the Lease kondense-system/kondense: 403 Forbidden" in why
    assert operator.readiness(None) == (False, "starting: kopf has not started the handlers yet")
