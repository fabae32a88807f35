"""reconcile: Job/Pod facts -> stage states, and plan -> children to create. Pure, no API server."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kondense.api import Summary
from kondense.errors import Reason
from kondense.events import summary_line
from kondense.manifests import ANNOTATION_DIGEST, is_cleanup
from kondense.reconcile import cleanup, invalid, observe_job, reconcile
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


def pod(exit_code=None, reason=None, message="", waiting=None, job_name=None):
    state = {}
    if exit_code is not None:
        state = {"terminated": {"exitCode": exit_code, "reason": reason or "Error", "message": message}}
    elif waiting:
        state = {"waiting": {"reason": waiting}}
    labels = {"job-name": job_name} if job_name else {}
    return {"metadata": {"creationTimestamp": NOW, "labels": labels}, "status": {"containerStatuses": [{"name": "stage", "state": state}]}}


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
