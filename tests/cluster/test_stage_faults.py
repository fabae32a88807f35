"""Faults inside a stage, end to end: the operator, the Job controller and the stage's own code.

A distill stage's pod is killed mid-run, as a lost node, a preemption or the OOM killer kills
it: the fake kubelet SIGKILLs its process group once the stage's first training checkpoint is
committed in the store. Exit code 137 is retryable (the Job's podFailurePolicy fails the Job
at once only on the stages' permanent exit codes), so the Job controller starts a second pod,
which resumes from the newest committed checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from kubernetes import client

from controlplane import wait_for
from test_operator import custom, jobs, pipeline_doc, wait_condition
from test_operator import operator, tiny_inputs, workspace  # noqa: F401 - fixtures

from kondense import api, events
from kondense.manifests import ANNOTATION_RUN, JOB_NAME_LABEL, LABEL_STAGE
from kondense.store import S3Store

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
GROUP, VERSION, PLURAL = api.GROUP, api.VERSION, api.PLURAL

# Far more steps between checkpoints than the killed attempt runs on while its first checkpoint
# uploads and the test notices the commit (up to ~17 on two busy cores; upload and steps scale
# together, roughly): the kill lands before the second checkpoint is begun.
EVERY, MAX_STEPS = 50, 100
DISTILL = {"method": "logits", "maxSteps": MAX_STEPS, "batchSize": 2, "maxSeqLength": 32,
           "learningRate": 1e-3, "checkpointEvery": EVERY}
STAGES = [
    {"name": "distill", "distill": DISTILL, "resources": {"backoffLimit": 1}},
    {"name": "gguf", "quantize": {"method": "gguf", "type": "q8_0"}},
]
COMMITTED = re.compile(r"step-(\d+)/manifest\.json")


def committed_steps(store: S3Store, checkpoints: str) -> list[int]:
    """Steps whose checkpoint is committed (manifest.json is written last), oldest first."""
    return sorted(int(m.group(1)) for key in store.list_keys(checkpoints) if (m := COMMITTED.fullmatch(key)))


def progress_steps(output: str) -> list[int]:
    """The steps of the training progress lines in a container's output."""
    lines = (events.parse_line(line) for line in output.splitlines())
    return [e["step"] for e in lines if e and e[events.KEY] == "progress" and e.get("phase") == "steps"]


def saved_steps(pod_dir: Path) -> list[int]:
    """The checkpoint folders the Trainer began to write in a pod's scratch (a killed pod leaves them)."""
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in pod_dir.glob("volumes/scratch/**/trainer/checkpoint-*"))


def test_a_stage_killed_mid_run_resumes_from_its_newest_checkpoint(
    operator, api_client, workspace, s3_bucket, s3_endpoint, fake_kubelet  # noqa: F811 - fixtures
):
    ns, core = workspace, client.CoreV1Api(api_client)
    store = S3Store(endpoint=s3_endpoint)
    custom(api_client).create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, pipeline_doc("killed", s3_bucket, s3_endpoint, STAGES))

    job = wait_for(lambda: next(iter(jobs(api_client, ns)), None), timeout=60, what="the distill stage's Job")
    assert job.metadata.labels[LABEL_STAGE] == "distill" and job.spec.backoff_limit == 1
    exit_codes = job.spec.pod_failure_policy.rules[0].on_exit_codes
    assert (job.spec.pod_failure_policy.rules[0].action, exit_codes.operator) == ("FailJob", "In")
    assert 137 not in exit_codes.values, "a SIGKILL must be retried, not fail the Job"
    run_doc = json.loads(job.spec.template.metadata.annotations[ANNOTATION_RUN])
    checkpoints = run_doc["output"].rstrip("/") + ".checkpoints"  # where the stage stages them

    def job_pods() -> list[client.V1Pod]:
        found = core.list_namespaced_pod(ns, label_selector=f"{JOB_NAME_LABEL}={job.metadata.name}").items
        return sorted(found, key=lambda p: p.metadata.creation_timestamp)

    def first_run():
        pods = job_pods()
        return pods and fake_kubelet.run_for(ns, pods[0].metadata.name)

    first = wait_for(first_run, timeout=60, what="the first pod to be taken by the fake kubelet")

    def first_alive() -> None:
        if first.done.is_set():
            raise AssertionError(f"the first attempt ended before a checkpoint was committed:\n{first.output()[-3000:]}")

    # Poll the store closely: the sooner the kill follows the commit, the fewer steps it loses.
    wait_for(lambda: committed_steps(store, checkpoints), timeout=300, interval=0.02, max_interval=0.02,
             check=first_alive, what=f"a checkpoint committed under {checkpoints}")
    first.kill()
    assert first.done.wait(30), "the killed pod's status was not reported"
    assert (first.exit_code, first.reason) == (137, "Error")
    committed = committed_steps(store, checkpoints)  # all the killed attempt committed: it is gone
    assert committed and committed[-1] < MAX_STEPS, committed

    done = wait_condition(api_client, ns, "killed", "Ready", timeout=420)

    # The Job retried the killed pod; its second pod resumed from the newest checkpoint.
    pods = job_pods()
    assert len(pods) == 2, [p.metadata.name for p in pods]
    killed, resumed = (p.status.container_statuses[0].state.terminated for p in pods)
    assert [p.status.phase for p in pods] == ["Failed", "Succeeded"]
    assert (killed.exit_code, killed.reason) == (137, "Error")
    summary = events.parse_summary(resumed.message or "")
    assert summary is not None and summary.state == "Succeeded", resumed.message
    second = fake_kubelet.run_for(ns, pods[1].metadata.name)
    assert second is not None and second is not first
    resumed_from = summary.metrics.get("resumedFromStep")
    assert resumed_from == committed[-1] > 0, (summary.metrics, committed, second.output()[-3000:])
    assert f"resuming from step {committed[-1]}" in second.output()
    assert summary.metrics["steps"] == MAX_STEPS
    ran = progress_steps(second.output())  # the step count continued from the checkpoint's
    assert ran[0] > resumed_from and ran[-1] == MAX_STEPS, ran

    # Steps redone: those the killed attempt completed past the step the next one resumed from.
    # Its progress lines are rate-limited (one a second), so they bound its last step from below;
    # the Trainer begins the folder of checkpoint N right after step N, so having completed step
    # N + 1 it had begun every checkpoint up to N: the newest folder it began, plus EVERY, bounds
    # it from above.
    began = saved_steps(first.dir)
    assert began, f"no checkpoint folder in the killed pod's scratch under {first.dir}"
    reached_low = max([*progress_steps(first.output()), began[-1]])
    reached_high = began[-1] + EVERY
    redone_low, redone_high = reached_low - resumed_from, reached_high - resumed_from
    figure = (f"steps redone: {redone_low:g}..{redone_high:g} of checkpointEvery {EVERY}: the killed attempt reached "
              f"step {reached_low}..{reached_high}, began checkpoints {began} and committed {committed}; the next "
              f"ran {MAX_STEPS - resumed_from:g} steps of {MAX_STEPS}, from step {resumed_from:g}")
    print(figure)
    assert 0 <= redone_low <= redone_high <= EVERY, f"more than one checkpoint interval may have been redone: {figure}"

    # The status says what the Jobs say: the stage took two pods of one Job; every other stage one.
    st = done["status"]
    by_name = {s["name"]: s for s in st["stages"]}
    assert [s["state"] for s in st["stages"]] == ["Succeeded", "Succeeded"]
    assert by_name["distill"]["job"] == job.metadata.name and by_name["distill"]["attempts"] == 2
    assert by_name["distill"]["metrics"]["resumedFromStep"] == resumed_from
    stage_jobs = {j.metadata.labels[LABEL_STAGE]: j for j in jobs(api_client, ns)}
    assert sorted(stage_jobs) == ["distill", "gguf"] and len(jobs(api_client, ns)) == 2
    distill_job = stage_jobs["distill"]
    assert distill_job.metadata.uid == job.metadata.uid, "the same Job, not a new one"
    assert (distill_job.status.failed, distill_job.status.succeeded) == (1, 1)
    gguf_job = stage_jobs["gguf"]
    assert (gguf_job.status.failed or 0, gguf_job.status.succeeded) == (0, 1) and by_name["gguf"]["attempts"] == 1
    assert len([r for r in fake_kubelet.runs if r.namespace == ns]) == 3, "two distill pods, one gguf pod"

    # The published student is committed; its staged checkpoints are gone.
    manifest = store.read_manifest(by_name["distill"]["artifact"]["uri"])
    assert manifest is not None and manifest.input_digest == by_name["distill"]["inputDigest"]
    assert store.list_keys(checkpoints) == []
