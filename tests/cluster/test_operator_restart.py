"""The operator SIGKILLed and restarted: mid-stage, and again at a stage boundary.

`python -m kondense.operator` processes as the chart runs them (leader election included); the
fake kubelet runs the stages. A killed operator writes nothing more, releases nothing, and
leaves its Lease to expire; the next one must take over from what the API server holds alone:
no Job created twice, no stage run twice, a status that matches the Jobs.
"""

from __future__ import annotations

import time

import pytest
from kubernetes import client

from controlplane import wait_for
# Fixtures and helpers shared with the other operator tests.
from test_leader_election import holder, operator_env, operator_token, replicas  # noqa: F401
from test_operator import STAGES, custom, jobs, pipeline_doc, wait_condition
from test_operator import tiny_inputs, workspace  # noqa: F401

from kondense import api
from kondense.manifests import LABEL_STAGE

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def job_of(api_client, namespace: str, stage: str) -> client.V1Job | None:
    return next((j for j in jobs(api_client, namespace) if j.metadata.labels.get(LABEL_STAGE) == stage), None)


def running_pod(api_client, namespace: str, job: str) -> bool:
    pods = client.CoreV1Api(api_client).list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    return any(p.status.phase == "Running" for p in pods)


def complete(job: client.V1Job | None) -> bool:
    return bool(job and any(c.type == "Complete" and c.status == "True" for c in job.status.conditions or []))


def test_an_operator_killed_mid_stage_and_at_a_stage_boundary_restarts_without_running_anything_twice(
    api_client, replicas, fake_kubelet, workspace, s3_bucket, s3_endpoint  # noqa: F811 - fixtures
):
    ns, name = workspace, "restarts"
    custom(api_client).create_namespaced_custom_object(
        api.GROUP, api.VERSION, ns, api.PLURAL, pipeline_doc(name, s3_bucket, s3_endpoint, STAGES[:2]))

    # 1. Mid-stage: the first stage's pod runs when the operator dies.
    first = replicas("op-1")
    distill = wait_for(lambda: job_of(api_client, ns, "distill"), timeout=120, what="op-1 to create distill's Job",
                       check=first.check_alive)
    wait_for(lambda: running_pod(api_client, ns, distill.metadata.name), timeout=60, what="distill's pod to run")
    first.process.kill()
    assert first.process.wait(10) == -9

    # 2. At the stage boundary: the next operator takes the expired Lease, sees distill complete
    #    and dies the moment nf4's Job exists: between creating it and recording it in the status.
    second = replicas("op-2")
    wait_for(lambda: job_of(api_client, ns, "nf4"), timeout=300, what="op-2 to create nf4's Job",
             interval=0.02, max_interval=0.02, check=second.check_alive)
    second.process.kill()
    assert second.process.wait(10) == -9
    status = custom(api_client).get_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL, name)["status"]
    print("killed at the boundary; the status said", {s["name"]: (s["state"], s.get("job")) for s in status["stages"]})

    # 3. The third operator finds everything as the API server holds it and finishes the run.
    third = replicas("op-3")
    done = wait_condition(api_client, ns, name, "Ready", timeout=420)
    stages = done["status"]["stages"]
    assert [(s["name"], s["state"]) for s in stages] == [("distill", "Succeeded"), ("nf4", "Succeeded")]
    # One Job per stage, each the one its stage's status names: none was created twice.
    created = sorted((j.metadata.labels[LABEL_STAGE], j.metadata.name) for j in jobs(api_client, ns))
    assert created == sorted((s["name"], s["job"]) for s in stages)
    # Each stage's container ran once: one pod per Job, no restart.
    for stage in stages:
        runs = [r for r in fake_kubelet.runs if r.namespace == ns and r.name.startswith(stage["job"] + "-")]
        assert len(runs) == 1 and runs[0].restarts == 0 and runs[0].exit_code == 0, (stage["name"], runs)
    # The status matches the Jobs: both complete, and the artifact each stage reports is its Job's.
    for stage in stages:
        job = client.BatchV1Api(api_client).read_namespaced_job(stage["job"], ns)
        assert complete(job) and stage["artifact"]["uri"].rsplit("/", 1)[-1].startswith(f"{stage['name']}-")
    third.check_alive()
    assert holder(api_client) == "op-3"
