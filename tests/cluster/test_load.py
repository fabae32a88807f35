"""500 pipelines through one operator process, the Job controller and the fake kubelet.

Each pipeline has one stage whose container the fake kubelet ends at once with a real summary
(the cheap stage of this test: what a stage's pod reports, without the seconds a Python stage
takes to start); everything else is the real path: the operator as the chart runs it, Jobs,
pods, the Job controller's completions, the status writes. Every pipeline must reach Ready with
its stage's artifact, none may be created a Job twice, and the operator's requests per pipeline
(from the API server's audit log) and peak RSS are printed and bounded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from kubernetes import client

from controlplane import wait_for
from fakekubelet import PodOutcome
from operator_harness import RELEASE_NAMESPACE
from test_leader_election import operator_env, operator_token, replicas  # noqa: F401 - fixtures
from test_operator import custom, pipeline_doc, scrape
from test_operator import tiny_inputs, workspace  # noqa: F401 - fixtures

from kondense import api
from kondense.api import Artifact, StageRun, Summary
from kondense.events import summary_line
from kondense.manifests import ANNOTATION_RUN

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PIPELINES = int(os.environ.get("KONDENSE_LOAD_PIPELINES", "500"))
BOUND_SECONDS = 600  # measured 176 s on 2 cores shared with other work
RSS_BOUND_MB = 250  # measured 140 MB
STAGE = {"name": "eval", "evaluate": {"of": ["student"], "seqLength": 32, "maxEvalTokens": 512}}


def finish_at_once(pod: dict) -> PodOutcome:
    """The stage's container ends at once with the summary a stage prints, naming its output."""
    run = StageRun.model_validate_json(pod["metadata"]["annotations"][ANNOTATION_RUN])
    summary = Summary(state="Succeeded", reason="Succeeded", message="evaluated",
                      artifact=Artifact(uri=run.output, digest="sha256:" + "0" * 64, size_bytes=1))
    return PodOutcome(0, message=summary_line(summary))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_500_pipelines_all_finish_with_no_status_lost(
    api_client, control_plane, replicas, fake_kubelet, workspace, s3_bucket, s3_endpoint  # noqa: F811
):
    namespace = workspace
    fake_kubelet.behaviour = finish_at_once
    operator = replicas("op-load")
    wait_for(lambda: (operator.health() or {}).get("leading"), timeout=90, what="the operator to lead",
             check=operator.check_alive)
    account = f"system:serviceaccount:{RELEASE_NAMESPACE}:"
    since = len(control_plane.audit_events())

    started = time.monotonic()
    pipelines = custom(api_client)
    for i in range(PIPELINES):
        doc = pipeline_doc(f"load-{i:04d}", s3_bucket, s3_endpoint, [STAGE])
        pipelines.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, doc)
    applied = time.monotonic() - started

    def finished() -> list[dict] | None:
        items = pipelines.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL)["items"]
        terminal = [p for p in items if any(c["type"] in ("Ready", "Failed") and c["status"] == "True"
                                            for c in (p.get("status") or {}).get("conditions", []))]
        return items if len(terminal) == PIPELINES else None

    items = wait_for(finished, timeout=BOUND_SECONDS, what=f"{PIPELINES} pipelines to finish", interval=2,
                     max_interval=5, check=operator.check_alive)
    took = time.monotonic() - started
    rss = peak_rss_mb(operator.process.pid)

    # No status update lost: every pipeline says Ready, for its generation, with its stage's artifact.
    for p in items:
        status = p["status"]
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        (stage,) = status["stages"]
        assert (ready["status"], stage["state"], status["observedGeneration"]) == ("True", "Succeeded", 1), p
        assert stage["artifact"]["uri"].rsplit("/", 1)[-1].startswith("eval-"), stage
    requests = [e for e in control_plane.audit_events()[since:]
                if e["user"]["username"].startswith(account) and e.get("stage") == "ResponseComplete"]
    jobs_created = [e for e in requests if e["verb"] == "create" and e["objectRef"]["resource"] == "jobs"
                    and e["responseStatus"]["code"] == 201]
    assert len(jobs_created) == PIPELINES, "a Job was created twice (or not at all)"
    samples = scrape(f"http://127.0.0.1:{operator.metrics_port}/metrics")  # its index saw every last update
    assert samples[("kondense_pipelines", (("phase", "Succeeded"),))] >= PIPELINES  # (other tests' may be there too)

    by_kind: dict[str, int] = {}
    for e in requests:
        ref = e.get("objectRef", {})
        kind = f"{e['verb']} {ref.get('resource', '?')}{'/' + ref['subresource'] if ref.get('subresource') else ''}"
        by_kind[kind] = by_kind.get(kind, 0) + 1
    print(f"{PIPELINES} pipelines applied in {applied:.1f} s, all finished {took:.1f} s after the first; "
          f"operator peak RSS {rss:.0f} MB; {len(requests) / PIPELINES:.2f} operator requests per pipeline:")
    for kind, count in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<45} {count / PIPELINES:.2f} per pipeline")
    assert rss <= RSS_BOUND_MB, f"operator peak RSS {rss:.0f} MB"
    assert took <= BOUND_SECONDS
