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
    meta = {"name": f"{job_name or 'j'}-{index or 0}-{created}", "creationTimestamp": created, "labels": labels}
    if index is not None:
        labels["batch.kubernetes.io/job-completion-index"] = str(index)
        meta["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    if deleting:
        meta["deletionTimestamp"] = finished
    phase = "Pending" if waiting else "Running" if exit_code is None else "Succeeded" if exit_code == 0 else "Failed"
    return {"metadata": meta, "status": {"phase": phase, "containerStatuses": [{"name": "stage", "state": state}]}}


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

    def delete(self, name, propagation="Background"):
        self.deleted.append(name)
        self.propagation = propagation


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


# -- pending with a reason, and fixes that take effect ---------------------------------------

def unscheduled(message="0/4 nodes are available: 4 Insufficient nvidia.com/gpu."):
    return {
        "metadata": {"name": "j-x", "creationTimestamp": NOW, "labels": {}},
        "status": {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]},
    }


def config_error():
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "s3-creds" not found'}
    return {"metadata": {"name": "j-y", "creationTimestamp": NOW, "labels": {}},
            "status": {"phase": "Pending", "containerStatuses": [{"name": "stage", "state": {"waiting": waiting}}]}}


def creating():
    scheduled = [{"type": "PodScheduled", "status": "True"}]
    waiting = {"waiting": {"reason": "ContainerCreating"}}
    return {"metadata": {"name": "j-z", "creationTimestamp": NOW, "labels": {}},
            "status": {"phase": "Pending", "conditions": scheduled, "containerStatuses": [{"name": "stage", "state": waiting}]}}


@pytest.mark.parametrize(
    "pods, create_error, reason, in_message",
    [
        ([unscheduled()], None, Reason.UNSCHEDULABLE, "4 Insufficient nvidia.com/gpu"),
        ([config_error()], None, Reason.CONFIG_ERROR, 'secret "s3-creds" not found'),
        ([creating()], None, Reason.STARTING, "ContainerCreating"),
        ([], 'pods "j-" is forbidden: no PriorityClass with name ml-batch was found', Reason.POD_CREATE_FAILED, "ml-batch"),
    ],
    ids=["unschedulable", "config-error", "starting", "failed-create"],
)
def test_a_pod_that_does_not_run_is_pending_with_the_servers_reason(pods, create_error, reason, in_message):
    o = observe_job(job(active=len(pods)), pods, create_error)
    assert (o.state, o.reason) == ("Pending", reason) and in_message in o.message
    if reason != Reason.STARTING:
        assert "hint:" in o.message


def started(body):
    """A reconcile of a new pipeline: its status, and the distill Job it created."""
    out, rec = run(body)
    distill = next(o for o in rec.created if o["kind"] == "Job" and "-distill-" in o["metadata"]["name"])
    distill["metadata"]["creationTimestamp"] = NOW
    return out, distill


def at(body, out, now, jobs=(), pods=()):
    rec = Recorder()
    result = reconcile({**body, "status": out.status.dump()}, list(jobs), list(pods), Settings(), now, rec.create,
                       rec.delete, lambda child: None)
    return result, rec


def test_a_failed_stage_runs_again_when_a_field_its_hint_names_is_edited():
    body = demo_body()
    out, distill = started(body)
    failed = {**distill, "status": job([("Failed", "DeadlineExceeded", "")])["status"]}
    out, rec = at(body, out, NOW, jobs=[failed])
    assert out.status.stages[0].state == "Failed" and "activeDeadlineSeconds" in out.status.stages[0].message
    out, rec = at(body, out, NOW, jobs=[failed])
    assert rec.deleted == [] and out.status.stages[0].state == "Failed", "nothing edited: it stays failed"

    body["spec"]["resources"] = {**body["spec"].get("resources", {}), "activeDeadlineSeconds": 7200}
    out2, rec = at(body, out, NOW, jobs=[failed])
    assert rec.deleted == [distill["metadata"]["name"]] and rec.propagation == "Foreground"
    assert ("Normal", "JobDeleted") in {e[:2] for e in out2.events}
    stage = out2.status.stages[0]
    assert (stage.state, stage.reason, stage.input_digest) == ("Pending", Reason.REPLACING, out.status.stages[0].input_digest)

    # The old Job is gone: a new one with the edited deadline, under the same Job name and artifact address.
    out3, rec = at(body, out2, NOW, jobs=[])
    new = next(o for o in rec.created if "-distill-" in o["metadata"]["name"])
    assert new["metadata"]["name"] == distill["metadata"]["name"] and new["spec"]["activeDeadlineSeconds"] == 7200
    assert out3.status.stages[0].state == "Pending" and out3.status.stages[0].run_digest != out.status.stages[0].run_digest


def test_a_failed_stage_whose_job_is_gone_runs_again_after_an_edit_or_a_retry_annotation():
    body = demo_body()
    out, distill = started(body)
    failed = {**distill, "status": job([("Failed", "BackoffLimitExceeded", "")], failed=3)["status"]}
    out, _ = at(body, out, NOW, jobs=[failed])
    out, rec = at(body, out, NOW, jobs=[])  # ttlSecondsAfterFinished removed it: the status is the record
    assert out.status.stages[0].state == "Failed" and not any("-distill-" in o["metadata"]["name"] for o in rec.created)

    retried = {**body, "metadata": {**body["metadata"], "annotations": {"kondense.io/retry": "1"}}}
    out2, rec = at(retried, out, NOW, jobs=[])
    new = next(o for o in rec.created if "-distill-" in o["metadata"]["name"])
    assert new["metadata"]["annotations"]["kondense.io/run-digest"] == out2.status.stages[0].run_digest
    assert out2.status.stages[0].state == "Pending"

    body["spec"]["resources"] = {**body["spec"].get("resources", {}), "memory": "64Gi"}
    _, rec = at(body, out, NOW, jobs=[])
    assert any("-distill-" in o["metadata"]["name"] for o in rec.created)


def test_a_job_that_has_not_started_is_rebuilt_when_its_resources_change():
    body = demo_body()
    out, distill = started(body)
    waiting = [{**unscheduled(), "metadata": {**unscheduled()["metadata"], "labels": {"job-name": distill["metadata"]["name"]}}}]
    pending = {**distill, "status": {"active": 1}}
    out, rec = at(body, out, NOW, jobs=[pending], pods=waiting)
    assert (out.status.stages[0].state, out.status.stages[0].reason) == ("Pending", Reason.UNSCHEDULABLE)
    assert ("Warning", Reason.UNSCHEDULABLE) in {e[:2] for e in out.events}
    body["spec"]["resources"] = {**body["spec"].get("resources", {}), "memory": "96Gi"}
    out2, rec = at(body, out, NOW, jobs=[pending], pods=waiting)
    assert rec.deleted == [distill["metadata"]["name"]]
    assert out2.status.stages[0].reason == Reason.REPLACING


def test_a_running_job_keeps_running_and_says_the_edit_applies_from_the_next_attempt():
    body = demo_body()
    out, distill = started(body)
    running = {**distill, "status": {"active": 1}}
    pods = [pod(job_name=distill["metadata"]["name"])]
    out, _ = at(body, out, NOW, jobs=[running], pods=pods)
    body["spec"]["resources"] = {**body["spec"].get("resources", {}), "memory": "96Gi"}
    out2, rec = at(body, out, NOW, jobs=[running], pods=pods)
    stage = out2.status.stages[0]
    assert rec.deleted == [] and stage.state == "Running" and "next attempt" in stage.message
    assert [e[1] for e in out2.events].count("EditDeferred") == 1
    out3, _ = at(body, out2, NOW, jobs=[running], pods=pods)
    assert "EditDeferred" not in [e[1] for e in out3.events], "said once"


def test_a_stage_pending_past_its_timeout_fails_with_the_pending_reason():
    body = demo_body()
    body["spec"]["resources"] = {**body["spec"].get("resources", {}), "pendingTimeoutSeconds": 600}
    out, distill = started(body)
    waiting = [{**unscheduled(), "metadata": {**unscheduled()["metadata"], "labels": {"job-name": distill["metadata"]["name"]}}}]
    pending = {**distill, "status": {"active": 1}}
    out, rec = at(body, out, "2026-01-01T00:05:00Z", jobs=[pending], pods=waiting)
    assert out.status.stages[0].state == "Pending" and rec.deleted == [] and out.retry_after == 301
    out, rec = at(body, out, "2026-01-01T00:10:00Z", jobs=[pending], pods=waiting)
    stage = out.status.stages[0]
    assert (stage.state, stage.reason) == ("Failed", Reason.UNSCHEDULABLE) and "pending for more than 600s" in stage.message
    assert rec.deleted == [distill["metadata"]["name"]]
    failed = next(c for c in out.status.conditions if c.type == "Failed")
    assert failed.status == "True" and failed.reason == Reason.UNSCHEDULABLE


def test_a_job_suspended_for_kueue_too_long_asks_about_kueue_on_the_ready_condition():
    body = demo_body()
    body["spec"]["resources"] = {**body["spec"].get("resources", {}), "pendingTimeoutSeconds": 600, "queueName": "gpu"}
    out, distill = started(body)
    queued = {**distill, "spec": {**distill["spec"], "suspend": True}, "status": {}}
    out, rec = at(body, out, "2026-01-01T01:00:00Z", jobs=[queued])
    stage = out.status.stages[0]
    assert (stage.state, stage.reason) == ("Pending", Reason.QUEUED) and rec.deleted == []
    ready = next(c for c in out.status.conditions if c.type == "Ready")
    assert ready.reason == Reason.QUEUED and "LocalQueue 'gpu'" in ready.message and "Kueue" in ready.message


def test_failed_condition_is_false_with_its_own_reason_while_nothing_failed():
    out, _ = run(demo_body())
    failed = next(c for c in out.status.conditions if c.type == "Failed")
    assert (failed.status, failed.reason) == ("False", Reason.NO_FAILURE)


def test_a_superseded_job_that_is_deleted_leaves_an_event():
    body = demo_body()
    out, distill = started(body)
    body["spec"]["stages"][0]["distill"]["temperature"] = 4.0
    out, rec = at(body, out, NOW, jobs=[{**distill, "status": {"active": 1}}])
    assert rec.deleted == [distill["metadata"]["name"]]
    assert ("Normal", "JobDeleted", f"deleted Job {distill['metadata']['name']}: superseded by an edit of the pipeline's spec") in out.events


def test_an_image_the_operator_does_not_allow_creates_nothing_and_keeps_the_artifacts():
    settings = Settings(allowed_images=("registry.example/ml/",))
    rec = Recorder()
    storage = {"uri": "s3://bucket/runs", "deletionPolicy": "Delete"}
    body = demo_body(image="evil.example/miner:1", storage=storage)
    refused = r"spec.image: 'evil.example/miner:1' is not allowed .*registry.example/ml/"
    with pytest.raises(InvalidSpec, match=refused):
        reconcile(body, [], [], settings, NOW, rec.create, rec.delete, lambda child: None)
    out = cleanup(body, [], [], settings, rec.create, rec.delete, lambda child: None)
    assert out.state == "Failed" and out.message.startswith("artifacts kept")
    assert "KONDENSE_ALLOWED_IMAGES" in out.message and rec.created == [] and rec.deleted == []
    allowed = demo_body(image="registry.example/ml/jobs:2")
    reconcile(allowed, [], [], settings, NOW, rec.create, rec.delete, lambda child: None)
    images = {c["spec"]["template"]["spec"]["containers"][0]["image"] for c in rec.created}
    assert images == {"registry.example/ml/jobs:2"}


def test_a_job_without_pods_is_asked_for_its_create_errors_only_once_past_the_grace():
    """The Job controller creates pods within moments of starting a Job; listing the FailedCreate
    events of every Job that has none yet would cost a request per new stage, nearly all for nothing."""
    from kondense.reconcile import POD_CREATE_GRACE_SECONDS, POD_CREATE_POLL_SECONDS

    body = demo_body()
    out, distill = started(body)
    asked = []

    def create_error(name):
        asked.append(name)
        return None

    def reconcile_at(now, job):
        return reconcile({**body, "status": out.status.dump()}, [job], [], Settings(), now, Recorder().create,
                         Recorder().delete, lambda child: None, pod_create_error=create_error)

    not_started = reconcile_at("2026-01-01T00:01:00Z", distill)  # the Job controller has not synced it yet
    assert asked == [] and not_started.retry_after is None  # its first sync is a watch event
    distill = {**distill, "status": {"startTime": NOW}}
    young = reconcile_at("2026-01-01T00:00:02Z", distill)
    assert asked == [] and young.retry_after == POD_CREATE_GRACE_SECONDS - 2  # looked at again once past it
    old = reconcile_at("2026-01-01T00:00:06Z", distill)
    assert asked == [distill["metadata"]["name"]] and old.retry_after == POD_CREATE_POLL_SECONDS


def test_what_waits_on_a_stage_refused_for_good_is_skipped_in_the_same_reconcile():
    from kondense.errors import ApiRejected

    def refuse(obj):
        if "-distill-" in obj["metadata"]["name"]:
            raise ApiRejected(Reason.INVALID_SPEC, 'Job.batch is invalid: spec.template.spec.nodeSelector: Invalid value', None)
        return True

    out = reconcile(demo_body(), [], [], Settings(), NOW, refuse, lambda name: None, lambda child: None)
    states = {s.name: s.state for s in out.status.stages}
    assert states["distill"] == "Failed" and states["ce-only"] == "Pending"  # ce-only does not need distill
    assert {n for n, s in states.items() if s == "Skipped"} == {"gguf", "gptq", "nf4", "eval"}, states


def test_with_on_missing_variant_skip_evaluate_runs_without_a_failed_variant_and_says_why():
    import json

    from kondense.manifests import ANNOTATION_RUN

    body = demo_body()
    body["spec"]["stages"][5]["evaluate"]["onMissingVariant"] = "skip"
    complete = job([("Complete", "", "")], succeeded=1)["status"]

    def stage_of(o):
        return o["metadata"]["labels"]["kondense.io/stage"]

    out, rec = run(body)
    jobs = {stage_of(o): {**o, "status": complete} for o in rec.created if o["kind"] == "Job"}
    out, rec = at(body, out, NOW, jobs=list(jobs.values()))
    jobs |= {stage_of(o): {**o, "status": complete} for o in rec.created if o["kind"] == "Job"}
    jobs["gguf"] = {**jobs["gguf"], "status": job([("Failed", "BackoffLimitExceeded", "")], failed=3)["status"]}
    # The reconcile that sees gguf fail records it; evaluate waits for the status to say so.
    out, rec = at(body, out, NOW, jobs=list(jobs.values()))
    states = {s.name: s.state for s in out.status.stages}
    assert states["gguf"] == "Failed" and states["eval"] == "Pending" and not rec.created
    out, rec = at(body, out, NOW, jobs=list(jobs.values()))
    [evaluate] = [o for o in rec.created if o["kind"] == "Job"]
    assert stage_of(evaluate) == "eval"
    stage_run = json.loads(evaluate["spec"]["template"]["metadata"]["annotations"][ANNOTATION_RUN])
    gguf = next(s for s in out.status.stages if s.name == "gguf")
    assert stage_run["missing"] == {"gguf": f"stage gguf failed: {gguf.reason}: {gguf.message}"}
    assert "gguf" not in stage_run["models"] and {"distill", "nf4", "gptq"} <= set(stage_run["models"])
    # Its own content address, which status records, and a stable reconcile from there.
    eval_status = next(s for s in out.status.stages if s.name == "eval")
    assert eval_status.input_digest == stage_run["inputDigest"] == evaluate["metadata"]["annotations"][ANNOTATION_DIGEST]
    jobs["eval"] = {**evaluate, "status": {"active": 1, "startTime": NOW}}
    out2, rec = at(body, out, NOW, jobs=list(jobs.values()))
    assert not rec.created and not rec.deleted
    assert next(s for s in out2.status.stages if s.name == "eval").state == "Running"


def test_with_the_default_a_failed_variant_blocks_evaluate():
    body = demo_body()
    complete = job([("Complete", "", "")], succeeded=1)["status"]
    out, rec = run(body)
    jobs = {o["metadata"]["labels"]["kondense.io/stage"]: {**o, "status": complete} for o in rec.created}
    out, rec = at(body, out, NOW, jobs=list(jobs.values()))
    jobs |= {o["metadata"]["labels"]["kondense.io/stage"]: {**o, "status": complete} for o in rec.created}
    jobs["gguf"] = {**jobs["gguf"], "status": job([("Failed", "BackoffLimitExceeded", "")], failed=3)["status"]}
    for _ in range(2):
        out, rec = at(body, out, NOW, jobs=list(jobs.values()))
        assert not rec.created
    assert next(s for s in out.status.stages if s.name == "eval").state == "Skipped"
