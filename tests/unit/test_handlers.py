"""The kopf handlers against kmock: API errors and conflicts, each at the moment it hurts most.

The happy path and the real API server's semantics are tested end to end in tests/cluster;
here kmock answers chosen requests with errors a real cluster gives now and then.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from kmocking import (
    JOBS,
    NAMESPACE,
    PIPELINES,
    RefusingEmulator,
    first_job,
    names_of,
    pipeline_doc,
    requests_for,
)

from kondense.errors import Reason

pytestmark = [pytest.mark.kmock(cls=RefusingEmulator), pytest.mark.asyncio]


async def apply(k8s: RefusingEmulator, doc: dict) -> None:
    response = await k8s.post(f"/apis/{PIPELINES.rsplit('/', 1)[0]}/namespaces/{NAMESPACE}/{PIPELINES.rsplit('/', 1)[1]}", json=doc)
    assert response.status == 200, await response.text()


def stage(k8s: RefusingEmulator, pipeline: str, name: str) -> dict:
    status = k8s.objects[PIPELINES, NAMESPACE, pipeline].get("status") or {}
    return next((dict(s) for s in status.get("stages") or [] if s["name"] == name), {})


async def eventually(check, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return result


def events(k8s: RefusingEmulator) -> list[tuple[str, str, str]]:
    return [(r.data["type"], r.data["reason"], r.data["message"]) for r in requests_for(k8s, "create", "events")]


async def test_first_job_goes_through_a_busy_api_server(operator):
    operator.refuse("create", JOBS, 503, "the server is currently unable to handle the request", times=2)
    doc = pipeline_doc("p1")
    await apply(operator, doc)
    job = first_job(doc)["metadata"]["name"]
    await eventually(lambda: stage(operator, "p1", "distill").get("job") == job, "the distill stage to name its Job")
    assert names_of(operator, "jobs") == [job]
    assert len(requests_for(operator, "create", "jobs")) == 3  # two refusals, one success
    assert stage(operator, "p1", "distill")["reason"] == Reason.PENDING


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ('jobs.batch is forbidden: User "system:serviceaccount:kondense-system:kondense" cannot create resource "jobs"',
         Reason.FORBIDDEN),
        ('jobs.batch "p1-distill" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1',
         Reason.QUOTA_EXCEEDED),
    ],
)
async def test_refused_job_is_reported_on_the_stage_and_started_once_allowed(operator, message, reason):
    refusal = operator.refuse("create", JOBS, 403, message)
    await apply(operator, pipeline_doc("p1"))
    distill = await eventually(lambda: stage(operator, "p1", "distill").get("reason") == reason
                               and stage(operator, "p1", "distill"), f"distill to say {reason}")
    assert distill["state"] == "Pending" and message in distill["message"] and "hint:" in distill["message"]
    assert "job" not in distill or distill["job"] is None
    assert names_of(operator, "jobs") == []
    said = ("Warning", reason, f"stage distill: {distill['message']}")
    await eventually(lambda: said in events(operator), "a Warning event that says why")  # kopf posts them async

    operator.withdraw(refusal)  # the platform team fixes RBAC, or the quota frees up
    await eventually(lambda: stage(operator, "p1", "distill").get("job"), "the Job once allowed")
    assert stage(operator, "p1", "distill")["reason"] == Reason.PENDING
    assert len(names_of(operator, "jobs")) == 1


async def test_job_the_api_server_finds_invalid_fails_the_stage_without_retrying(operator):
    message = 'Job.batch "p1-distill" is invalid: spec.template.spec.nodeSelector: Invalid value: "a b"'
    operator.refuse("create", JOBS, 422, message)
    await apply(operator, pipeline_doc("p1"))
    distill = await eventually(lambda: stage(operator, "p1", "distill").get("state") == "Failed"
                               and stage(operator, "p1", "distill"), "distill to fail")
    assert distill["reason"] == Reason.INVALID_SPEC and "nodeSelector: Invalid value" in distill["message"]
    status = operator.objects[PIPELINES, NAMESPACE, "p1"]["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == Reason.INVALID_SPEC
    await asyncio.sleep(1.0)  # longer than every retry delay in these tests
    assert len(requests_for(operator, "create", "jobs")) == 1
    assert stage(operator, "p1", "gguf")["state"] == "Skipped"  # its input can never come


async def test_job_left_by_a_previous_operator_is_taken_over_not_duplicated(operator):
    doc = pipeline_doc("p1")
    job = first_job(doc)
    job["metadata"]["ownerReferences"] = [{"apiVersion": doc["apiVersion"], "kind": doc["kind"], "name": "p1",
                                           "uid": doc["metadata"]["uid"], "controller": True}]
    response = await operator.post(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", json=job)
    assert response.status == 200
    await apply(operator, doc)
    name = job["metadata"]["name"]
    await eventually(lambda: stage(operator, "p1", "distill").get("job") == name, "distill to name the existing Job")
    assert names_of(operator, "jobs") == [name]
    operator_creates = [r for r in requests_for(operator, "create", "jobs") if "kmock" not in r.headers.get("User-Agent", "")]
    assert len(operator_creates) <= 1  # at most one create, answered 409 AlreadyExists


async def test_status_write_goes_through_a_flaky_api_server(operator):
    operator.refuse("update", PIPELINES, 500, "etcdserver: leader changed", times=2, subresource="status")
    await apply(operator, pipeline_doc("p1"))
    await eventually(lambda: stage(operator, "p1", "distill").get("job"), "the status to land")
    assert len(requests_for(operator, "update", "compressionpipelines", "status")) >= 3


async def test_next_stage_refused_after_a_job_event_is_requeued(operator):
    doc = pipeline_doc("p1")
    await apply(operator, doc)
    distill = first_job(doc)["metadata"]["name"]
    await eventually(lambda: stage(operator, "p1", "distill").get("job") == distill, "distill's Job")
    # gguf's create fails longer than the write door retries in place (4 attempts).
    operator.refuse("create", JOBS, 503, "the server is currently unable to handle the request", times=6)
    completed = {"status": {"succeeded": 1, "completionTime": "2026-11-27T00:00:00Z", "conditions": [
        {"type": "Complete", "status": "True", "lastTransitionTime": "2026-11-27T00:00:00Z"}]}}
    response = await operator.patch(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{distill}/status", json=completed,
                                    headers={"Content-Type": "application/merge-patch+json"})
    assert response.status == 200
    await eventually(lambda: stage(operator, "p1", "gguf").get("reason") == Reason.API_UNAVAILABLE,
                     "gguf to say the API server is unavailable")
    gguf = await eventually(lambda: stage(operator, "p1", "gguf").get("job"), "gguf's Job after the requeue")
    assert gguf in names_of(operator, "jobs")
    # Said by the requeued reconcile, which runs on an executor thread outside kopf's handler context.
    await eventually(lambda: ("Normal", "StageStarted", f"stage gguf: created Job {gguf}") in events(operator),
                     "the StageStarted event of the requeued reconcile")
    assert stage(operator, "p1", "distill")["state"] == "Succeeded"
    assert len(requests_for(operator, "create", "jobs")) == 1 + 6 + 1


async def test_running_stage_progress_is_read_from_its_log_into_status(operator):
    doc = pipeline_doc("p1")
    await apply(operator, doc)
    job = first_job(doc)["metadata"]["name"]
    await eventually(lambda: stage(operator, "p1", "distill").get("job") == job, "distill's Job")
    response = await operator.patch(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{job}/status",
                                    json={"status": {"active": 1, "startTime": "2026-11-27T00:00:00Z"}},
                                    headers={"Content-Type": "application/merge-patch+json"})
    assert response.status == 200
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"{job}-x7k2p", "namespace": NAMESPACE, "uid": "pod-1", "creationTimestamp": "2026-11-27T00:00:00Z",
        "labels": {"kondense.io/pipeline": "p1", "kondense.io/stage": "distill", "job-name": job}},
        "status": {"phase": "Running"}}
    response = await operator.post(f"/api/v1/namespaces/{NAMESPACE}/pods", json=pod)
    assert response.status == 200
    log = ("2026-11-27 00:03:10 INFO kondense_jobs.distill: step 118\n"
           '{"kondense":"progress","stage":"distill","phase":"steps","step":120,"total":300,"etaSeconds":190.0,"loss":2.5}\n'
           "2026-11-27 00:03:11 INFO kondense_jobs.distill: saving\n")
    operator[f"/api/v1/namespaces/{NAMESPACE}/pods/{job}-x7k2p/log"] << log.encode()
    await eventually(lambda: stage(operator, "p1", "distill").get("progress") == "120/300 steps, ETA 3:10",
                     "the stage's progress from its log")
    status = operator.objects[PIPELINES, NAMESPACE, "p1"]["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["message"] == "running distill (120/300 steps, ETA 3:10)"
    reads = [r for r in operator if r.resource is not None and r.resource.plural == "pods" and r.subresource == "log"]
    assert reads and all(r.params.get("tailLines") == "20" and r.params.get("container") == "stage" for r in reads)


async def test_jobs_carry_kondense_labels_and_the_owner_reference_not_the_pipelines_labels(operator):
    """Argo CD tracks its objects by app.kubernetes.io/instance: a Job carrying its pipeline's
    would be shown, and pruned, as an object of the pipeline's application."""
    doc = pipeline_doc("p1")
    doc["metadata"]["labels"] = {"app.kubernetes.io/instance": "ml-apps", "team": "nlp"}
    await apply(operator, doc)
    name = first_job(doc)["metadata"]["name"]
    await eventually(lambda: name in names_of(operator, "jobs"), "the distill Job")
    job = operator.objects[JOBS, NAMESPACE, name]
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["kondense.io/pipeline"] == "p1"
        assert not {"app.kubernetes.io/instance", "team"} & set(labels), labels
    (owner,) = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("CompressionPipeline", "p1", "uid-1")
    assert owner["controller"] is True and job["metadata"]["namespace"] == NAMESPACE


async def test_jobs_and_pods_are_listed_and_watched_by_the_pipeline_label(operator):
    """kopf applies `labels=` to what its watch brought in; the API server filters only what the
    request asks for (kmock does not filter: this checks the requests)."""
    wanted = [(action, plural) for action in ("list", "watch") for plural in ("jobs", "pods")]
    await eventually(lambda: all(requests_for(operator, action, plural) for action, plural in wanted),
                     "the lists and watches of Jobs and pods")
    for action, plural in wanted:
        for request in requests_for(operator, action, plural):
            assert request.params.get("labelSelector") == "kondense.io/pipeline", (action, plural)
    pipelines = requests_for(operator, "watch", "compressionpipelines")
    assert pipelines and all("labelSelector" not in r.params for r in pipelines)


async def test_a_pipeline_is_reconciled_at_each_generation_and_only_its_status_is_written(operator, caplog):
    """kondense reconciles by metadata.generation, not by kopf's diffs: kopf's diff base, a patch
    of the pipeline itself after every create and spec edit, is never written, and changes that
    leave the generation as it was (its own status writes, labels) start no reconcile of it."""
    caplog.set_level(logging.INFO, logger="kondense.handlers")
    doc = pipeline_doc("p1")
    await apply(operator, doc)
    first = first_job(doc)["metadata"]["name"]
    await eventually(lambda: stage(operator, "p1", "distill").get("job") == first, "the first generation's Job")
    url = f"/apis/{PIPELINES.rsplit('/', 1)[0]}/namespaces/{NAMESPACE}/compressionpipelines/p1"
    merge = {"Content-Type": "application/merge-patch+json"}
    response = await operator.patch(url, json={"metadata": {"labels": {"team": "nlp"}}}, headers=merge)
    assert response.status == 200

    edited = {"metadata": {"generation": 2}, "spec": {"stages": [{**doc["spec"]["stages"][0], "distill": {
        **doc["spec"]["stages"][0]["distill"], "temperature": 4.0}}, *doc["spec"]["stages"][1:]]}}
    response = await operator.patch(url, json=edited, headers=merge)  # (the API server bumps generation itself)
    assert response.status == 200
    second = await eventually(lambda: (j := stage(operator, "p1", "distill").get("job")) != first and j,
                              "the second generation's Job")
    assert sorted(names_of(operator, "jobs")) == sorted([first, second])
    assert operator.objects[PIPELINES, NAMESPACE, "p1"]["status"]["observedGeneration"] == 2
    generations = [r.getMessage() for r in caplog.records if "reconciling generation" in r.getMessage()]
    assert generations == [f"{NAMESPACE}/p1: reconciling generation 1", f"{NAMESPACE}/p1: reconciling generation 2"]
    by_operator = [r for r in requests_for(operator, "patch", "compressionpipelines")
                   if "kmock" not in r.headers.get("User-Agent", "")]
    assert by_operator == [], "the operator patched the pipeline itself, not only its status"
    annotations = operator.objects[PIPELINES, NAMESPACE, "p1"]["metadata"].get("annotations") or {}
    assert not [a for a in annotations if "last-handled-configuration" in a], annotations


def test_kopfs_essence_of_an_object_holds_only_what_a_handlers_filter_reads():
    """kopf builds an essence of every pipeline, Job and pod event and copies it three times more;
    kondense compares none, so it holds only the field delete_artifacts filters on."""
    from kondense.handlers import NoDiffBase

    storage = NoDiffBase()
    doc = pipeline_doc("p1")
    doc["spec"]["storage"]["deletionPolicy"] = "Delete"
    assert storage.build(body=doc) == {"spec": {"storage": {"deletionPolicy": "Delete"}}}
    assert storage.fetch(body=doc) == storage.build(body=doc)  # nothing ever reads as changed
    assert storage.build(body=first_job(pipeline_doc("p1"))) == {}
