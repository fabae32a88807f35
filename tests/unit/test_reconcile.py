"""reconcile: Job/Pod facts -> stage states, and plan -> children to create. Pure, no API server."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kondense.api import Artifact, Summary
from kondense.errors import Reason
from kondense.events import summary_line
from kondense.manifests import ANNOTATION_DIGEST, is_cleanup
from kondense.reconcile import cleanup, completion_index, deciding_termination, invalid, observe_job, reconcile
from kondense.errors import InvalidSpec
from kondense.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
NOW = "2026-01-01T00:00:00Z"


def job(conditions=(), active=0, failed=0, succeeded=0, suspend=False):
    return {
        "metadata": {"name": "j"},
        "spec": {"suspend": suspend},
        "status": {
            "conditions": [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conditions],
            "active": active, "failed": failed, "succeeded": succeeded, "startTime": NOW,
        },
    }


def pod(exit_code=None, reason=None, message="", waiting=None, job_name=None, index=None, created=NOW, finished=NOW,
        deleting=False):
    """A stage pod; `index` makes it a pod of an Indexed Job, `deleting` one the Job controller stops."""
    state = {}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": reason or "Error", "message": message, "finishedAt": finished}}
    elif waiting:
        state = {"waiting": {"reason": waiting}}
    labels = {"job-name": job_name} if job_name else {}
    meta = {"creationTimestamp": created, "labels": labels}
    if index is not None:
        labels["batch.kubernetes.io/job-completion-index"] = str(index)
        meta["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    if deleting:
        meta["deletionTimestamp"] = finished
    return {"metadata": meta, "status": {"containerStatuses": [{"name": "stage", "state": state}]}}


GATE = summary_line(Summary(state="Failed", reason=Reason.QUALITY_GATE_FAILED, message="gguf: +4.6% over distill"))
OK = summary_line(Summary(state="Succeeded", reason="Succeeded", metrics={"loss": 1.0}))


@pytest.mark.parametrize(
    "j, pods, state, reason, in_message",
    [
        (job(active=1), [pod()], "Running", Reason.RUNNING, ""),
        (job([("Complete", "", "")], succeeded=1), [pod(0, "Completed", OK)], "Succeeded", Reason.SUCCEEDED, ""),
        (job([("Failed", "PodFailurePolicy", "")], failed=1), [pod(13, message=GATE)], "Failed", Reason.QUALITY_GATE_FAILED, "gguf: +4.6%"),
        (job([("Failed", "BackoffLimitExceeded", "")], failed=3), [pod(137, "OOMKilled")], "Failed", Reason.OOM_KILLED, "raise resources.memory"),
        (job([("Failed", "BackoffLimitExceeded", "")], failed=3), [pod(21, message="log line\n")], "Failed", Reason.CUDA_OUT_OF_MEMORY, "lower batchSize"),
        (job([("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")]), [], "Failed", Reason.DEADLINE_EXCEEDED, "activeDeadlineSeconds"),
        (job([("Failed", "PodFailurePolicy", "")], failed=1), [pod(15)], "Failed", Reason.STORAGE_ACCESS_DENIED, "credentialsSecret"),
        (job(active=1), [pod(waiting="ImagePullBackOff")], "Pending", Reason.IMAGE_PULL_FAILED, "spec.image"),
        (job(suspend=True), [], "Pending", "Queued", "Kueue"),
    ],
    ids=["running", "complete", "quality-gate", "oom-killed", "cuda-oom-from-exit-code", "deadline", "storage-denied", "image-pull", "queued"],
)
def test_observe_job(j, pods, state, reason, in_message):
    o = observe_job(j, pods)
    assert (o.state, o.reason) == (state, reason)
    assert in_message in o.message


# -- Indexed Jobs (a distill stage on several nodes) -----------------------------------------

PUBLISHED = summary_line(Summary(state="Succeeded", reason="Succeeded", metrics={"loss": 0.5},
                                 artifact=Artifact(uri="s3://b/p/distill-ab", digest="sha256:ab", size_bytes=1)))
WORKER_DONE = summary_line(Summary(state="Succeeded", reason="Succeeded"))
CUDA_OOM = summary_line(Summary(state="Failed", reason=Reason.CUDA_OUT_OF_MEMORY, message="CUDA out of memory on rank 3"))
PEER_LOST = summary_line(Summary(state="Failed", reason=Reason.ERROR, message="rank 0: connection closed by peer"))
T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z"


@pytest.mark.parametrize(
    "pod_, index",
    [
        (pod(0), None),
        (pod(0, index=0), 0),
        (pod(0, index=12), 12),
        ({"metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": "3"}}}, 3),  # before 1.28: no label
        ({"metadata": {"labels": {"batch.kubernetes.io/job-completion-index": "x"}}}, None),
    ],
    ids=["plain-job", "index-0", "index-12", "annotation-only", "garbage"],
)
def test_completion_index(pod_, index):
    assert completion_index(pod_) == index


@pytest.mark.parametrize(
    "pods, complete, expected",
    [
        # A plain Job: its newest terminated pod, whatever it says.
        ([pod(1, message="first", created=T0), pod(21, message="retry", created=T1)], False, "retry"),
        ([pod(1, message="first", created=T0), pod(0, message=OK, created=T1)], True, OK),
        ([pod(1, message="first", created=T0), pod(created=T1)], False, "first"),  # the retry still runs
        # Complete: index 0 speaks when it published ...
        ([pod(0, message=WORKER_DONE, index=1), pod(0, message=PUBLISHED, index=0)], True, PUBLISHED),
        # ... and whichever pod published when the rendezvous gave rank 0 to another index.
        ([pod(0, message=WORKER_DONE, index=0), pod(0, message=PUBLISHED, index=1)], True, PUBLISHED),
        ([pod(0, message=WORKER_DONE, index=1), pod(0, message="", index=0)], True, ""),  # nothing published: index 0
        # Failed: the first failure among the pods that failed on their own.
        ([pod(0, message=WORKER_DONE, index=0), pod(21, message=CUDA_OOM, index=1)], False, CUDA_OOM),
        ([pod(1, message=PEER_LOST, index=0, finished=T2), pod(21, message=CUDA_OOM, index=1, finished=T1)], False, CUDA_OOM),
        ([pod(143, message="", index=0, finished=T0, deleting=True), pod(21, message=CUDA_OOM, index=1, finished=T1)],
         False, CUDA_OOM),
        ([pod(21, message=CUDA_OOM, index=1, finished=T1), pod(1, message=PEER_LOST, index=0, finished=T1)], False, PEER_LOST),
        # An index retried by the Job controller speaks through its newest pod only.
        ([pod(21, message=CUDA_OOM, index=1, created=T0, finished=T0), pod(1, message=PEER_LOST, index=0, finished=T2),
          pod(137, "OOMKilled", index=1, created=T1, finished=T1)], False, ""),
        ([pod(21, message=CUDA_OOM, index=1, created=T0, finished=T0), pod(0, message=PUBLISHED, index=0, created=T0),
          pod(0, message=WORKER_DONE, index=1, created=T1)], True, PUBLISHED),
        ([], True, None),
    ],
    ids=[
        "plain-failed-newest", "plain-complete", "plain-newest-running", "complete-index-0", "complete-rank-0-elsewhere",
        "complete-nothing-published", "failed-one-index", "failed-first-to-fail", "failed-not-the-stopped-pod",
        "failed-tie-lowest-index", "failed-retried-index", "complete-after-retry", "no-pods",
    ],
)
def test_deciding_termination(pods, complete, expected):
    term = deciding_termination(pods, complete)
    assert (term if term is None else term["message"]) == expected


@pytest.mark.parametrize(
    "j, pods, state, reason, in_message",
    [
        (job([("Complete", "", "")], succeeded=2), [pod(0, message=WORKER_DONE, index=1), pod(0, message=PUBLISHED, index=0)],
         "Succeeded", Reason.SUCCEEDED, ""),
        (job([("Failed", "PodFailurePolicy", "")], failed=2),
         [pod(1, message=PEER_LOST, index=0, finished=T2), pod(21, message=CUDA_OOM, index=1, finished=T1)],
         "Failed", Reason.CUDA_OUT_OF_MEMORY, "on rank 3"),
        (job([("Failed", "BackoffLimitExceeded", "")], failed=1),
         [pod(137, "OOMKilled", index=1, finished=T1), pod(137, "Error", index=0, finished=T2, deleting=True)],
         "Failed", Reason.OOM_KILLED, "raise resources.memory"),
        (job(active=2), [pod(0, message=WORKER_DONE, index=1), pod(index=0)], "Running", Reason.RUNNING, ""),
    ],
    ids=["complete", "cuda-oom-on-one-node", "oom-killed-one-node", "one-node-done-one-running"],
)
def test_observe_indexed_job(j, pods, state, reason, in_message):
    o = observe_job(j, pods)
    assert (o.state, o.reason) == (state, reason) and in_message in o.message
    if state == "Succeeded":
        assert o.summary is not None and o.summary.artifact.uri == "s3://b/p/distill-ab" and o.summary.metrics == {"loss": 0.5}


def demo_body(**spec_changes):
    doc = yaml.safe_load((ROOT / "crds/examples/demo.yaml").read_text())
    doc["metadata"].update(namespace="ns", uid="u1", generation=1)
    doc["spec"].update(spec_changes)
    return doc


class Recorder:
    def __init__(self):
        self.created, self.deleted = [], []

    def create(self, obj):
        self.created.append(obj)
        return True

    def delete(self, name):
        self.deleted.append(name)


def run(body, jobs=(), pods=()):
    rec = Recorder()
    out = reconcile(body, list(jobs), list(pods), Settings(), NOW, rec.create, rec.delete, lambda child: None)
    return out, rec


def test_first_reconcile_creates_the_first_stage_and_reports_pending():
    out, rec = run(demo_body())
    kinds = [(o["kind"], o["metadata"]["labels"]["kondense.io/stage"]) for o in rec.created]
    assert kinds == [("Job", "distill"), ("Job", "ce-only")]
    assert out.changed and out.status.progress == "0/6"
    ready = next(c for c in out.status.conditions if c.type == "Ready")
    assert ready.status == "False"
    assert [s.state for s in out.status.stages][:3] == ["Pending", "Pending", "Pending"]


def test_completed_distill_starts_quantize_stages_and_reconcile_is_stable():
    body = demo_body()
    out, rec = run(body)
    distill_job = next(o for o in rec.created if o["kind"] == "Job" and "distill" in o["metadata"]["name"])
    done = {**distill_job, "status": job([("Complete", "", "")], succeeded=1)["status"]}
    body["status"] = out.status.dump()
    out2, rec2 = run(body, jobs=[done])
    started = sorted(o["metadata"]["labels"]["kondense.io/stage"] for o in rec2.created if o["kind"] == "Job")
    assert started == ["ce-only", "gguf", "gptq", "nf4"]  # ce-only's create is idempotent (409 in a cluster)
    body["status"] = out2.status.dump()
    out3, _ = run(body, jobs=[done])
    assert not out3.changed, "a second reconcile over the same facts must not patch status"


def test_superseded_running_job_is_deleted_after_a_spec_edit():
    body = demo_body()
    _, rec = run(body)
    old = next(o for o in rec.created if o["kind"] == "Job" and "-distill-" in o["metadata"]["name"])
    old = {**old, "status": {"active": 1}}
    body["spec"]["stages"][0]["distill"]["temperature"] = 4.0
    body["metadata"]["generation"] = 2
    out, rec2 = run(body, jobs=[old])
    assert rec2.deleted == [old["metadata"]["name"]]
    new = next(o for o in rec2.created if o["kind"] == "Job" and "-distill-" in o["metadata"]["name"])
    assert new["metadata"]["annotations"][ANNOTATION_DIGEST] != old["metadata"]["annotations"][ANNOTATION_DIGEST]
    assert out.status.observed_generation == 2


def test_job_the_api_server_refuses_for_now_leaves_the_stage_pending_with_a_retry():
    from kondense.errors import ApiRejected

    def refuse(obj):
        raise ApiRejected(Reason.FORBIDDEN, "jobs.batch is forbidden (hint: grant it)", 60.0)

    out = reconcile(demo_body(), [], [], Settings(), NOW, refuse, lambda name: None, lambda child: None)
    distill = out.status.stages[0]
    assert (distill.state, distill.reason, distill.job) == ("Pending", Reason.FORBIDDEN, None)
    assert out.retry_after == 60.0 and ("Warning", Reason.FORBIDDEN, "stage distill: jobs.batch is forbidden (hint: grant it)") in out.events


@pytest.mark.parametrize(
    "finished, state",
    [
        (job([("Complete", "", "")], succeeded=1), "Succeeded"),
        (job([("Failed", "BackoffLimitExceeded", "")], failed=3), "Failed"),
    ],
)
def test_finished_stage_survives_job_garbage_collection_until_its_spec_changes(finished, state):
    body = demo_body()
    out, rec = run(body)
    distill_job = next(o for o in rec.created if o["kind"] == "Job" and "-distill-" in o["metadata"]["name"])
    out2, _ = run({**body, "status": out.status.dump()}, jobs=[{**distill_job, "status": finished["status"]}])
    assert out2.status.stages[0].state == state
    out3, rec3 = run({**body, "status": out2.status.dump()}, jobs=[])  # ttlSecondsAfterFinished removed the Job
    assert out3.status.stages[0].state == state and not out3.changed
    assert not any("-distill-" in o["metadata"]["name"] for o in rec3.created), "the status is the record"
    body["spec"]["stages"][0]["distill"]["temperature"] = 4.0  # an edit: a new content address
    _, rec4 = run({**body, "status": out3.status.dump()}, jobs=[])
    assert any("-distill-" in o["metadata"]["name"] for o in rec4.created)


def test_invalid_spec_reports_failed_with_field_path_and_creates_nothing():
    body = demo_body()
    body["spec"]["stages"][3]["from"] = "ghost"
    with pytest.raises(InvalidSpec) as e:
        run(body)
    out = invalid(body, e.value, NOW)
    failed = next(c for c in out.status.conditions if c.type == "Failed")
    assert failed.status == "True" and failed.reason == "InvalidSpec" and "spec.stages[3].from" in failed.message


def cleanup_run(body, jobs=(), pods=()):
    rec = Recorder()
    out = cleanup(body, list(jobs), list(pods), Settings(), rec.create, rec.delete, lambda child: None)
    return out, rec


def test_cleanup_stops_running_stages_first_then_runs_its_job_then_lets_go():
    body = demo_body(storage={"uri": "s3://bucket/runs", "deletionPolicy": "Delete"})
    _, rec = run(body)
    distill = {**rec.created[0], "status": {"active": 1}}
    out, rec1 = cleanup_run(body, jobs=[distill])
    assert out.state == "Waiting" and rec1.deleted == [distill["metadata"]["name"]] and not rec1.created

    done = {**distill, "status": job([("Complete", "", "")], succeeded=1)["status"]}
    out, rec2 = cleanup_run(body, jobs=[done])
    assert out.state == "Waiting" and [is_cleanup(j) for j in rec2.created] == [True]
    assert out.events[0][1] == "CleanupStarted"
    cleanup_job = rec2.created[0]
    assert "s3://bucket/runs/ns/" in " ".join(cleanup_job["spec"]["template"]["spec"]["containers"][0]["args"])

    # A running cleanup Job is the operator's own: reconcile never takes it for a superseded stage.
    _, rec3 = run(body, jobs=[done, {**cleanup_job, "status": {"active": 1}}])
    assert rec3.deleted == []

    finished = {**cleanup_job, "status": job([("Complete", "", "")], succeeded=1)["status"]}
    ok = summary_line(Summary(state="Succeeded", reason="Succeeded", message="deleted 7 objects under s3://bucket/runs/ns/demo"))
    pods = [pod(0, "Completed", ok, job_name=cleanup_job["metadata"]["name"])]
    out, rec4 = cleanup_run(body, jobs=[done, finished], pods=pods)
    assert out.state == "Done" and out.events == [("Normal", "ArtifactsDeleted", "deleted 7 objects under s3://bucket/runs/ns/demo")]
    assert not rec4.created and not rec4.deleted


def test_failed_cleanup_lets_the_pipeline_go_and_says_the_artifacts_stay():
    body = demo_body(storage={"uri": "s3://bucket/runs", "deletionPolicy": "Delete"})
    _, rec = cleanup_run(body)
    failed = {**rec.created[0], "status": job([("Failed", "PodFailurePolicy", "")], failed=1)["status"]}
    denied = summary_line(Summary(state="Failed", reason=Reason.STORAGE_ACCESS_DENIED, message="s3://bucket/runs: AccessDenied"))
    pods = [pod(15, message=denied, job_name=failed["metadata"]["name"])]
    out, _ = cleanup_run(body, jobs=[failed], pods=pods)
    assert out.state == "Failed" and out.message.startswith("artifacts kept") and "AccessDenied" in out.message
    assert out.events[0][:2] == ("Warning", Reason.STORAGE_ACCESS_DENIED)


def test_multi_node_stage_creates_its_service_then_its_job_both_adopted():
    body = demo_body()
    body["spec"]["stages"][0]["resources"] = {"gpus": 0, "workers": 1, "nodes": 2}
    rec, adopted = Recorder(), []
    out = reconcile(body, [], [], Settings(), NOW, rec.create, rec.delete, adopted.append)
    kinds = [(o["kind"], o["metadata"]["labels"]["kondense.io/stage"]) for o in rec.created]
    assert kinds == [("Service", "distill"), ("Job", "distill"), ("Job", "ce-only")]
    service, indexed = rec.created[:2]
    assert adopted == rec.created  # owned by the pipeline: garbage-collected with it
    assert indexed["spec"]["completionMode"] == "Indexed" and service["spec"]["selector"] == {
        "batch.kubernetes.io/job-name": indexed["metadata"]["name"]}
    assert out.status.stages[0].job == indexed["metadata"]["name"]
    assert [e for e in out.events if e[1] == "StageStarted"][0][2] == f"stage distill: created Job {indexed['metadata']['name']}"

    # The Indexed Job completes: the pod that published speaks for the stage.
    done = {**indexed, "status": job([("Complete", "", "")], succeeded=2)["status"]}
    name = indexed["metadata"]["name"]
    pods = [pod(0, message=WORKER_DONE, job_name=name, index=1), pod(0, message=PUBLISHED, job_name=name, index=0)]
    out2, rec2 = run({**body, "status": out.status.dump()}, jobs=[done], pods=pods)
    distill = out2.status.stages[0]
    assert distill.state == "Succeeded" and distill.artifact.uri == "s3://b/p/distill-ab"
    assert "Service" not in {o["kind"] for o in rec2.created}, "a finished stage needs no Service"


def test_refused_service_leaves_the_stage_pending_without_its_job():
    from kondense.errors import ApiRejected

    body = demo_body()
    body["spec"]["stages"][0]["resources"] = {"gpus": 0, "workers": 1, "nodes": 2}
    created = []

    def create(obj):
        if obj["kind"] == "Service":
            raise ApiRejected(Reason.FORBIDDEN, "services is forbidden (hint: grant it)", 30.0)
        created.append(obj)
        return True

    out = reconcile(body, [], [], Settings(), NOW, create, lambda name: None, lambda child: None)
    assert [(o["kind"], o["metadata"]["labels"]["kondense.io/stage"]) for o in created] == [("Job", "ce-only")]
    distill = out.status.stages[0]
    assert (distill.state, distill.reason, distill.job) == ("Pending", Reason.FORBIDDEN, None) and out.retry_after == 30.0
