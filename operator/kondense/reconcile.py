"""One reconciliation of a CompressionPipeline: observe children, plan, act, report.

Called by every handler (create, update, resume, Job and Pod events). The stage states are
derived from the Jobs and their pods each time; a stage whose Job was garbage-collected
(ttlSecondsAfterFinished) keeps the Succeeded record in status for the same input digest.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Callable, Mapping

from kondense import api, events
from kondense.errors import HINTS, ApiRejected, InvalidSpec, Reason, outcome_for_exit
from kondense.manifests import (
    ANNOTATION_DIGEST,
    ANNOTATION_RETRY,
    ANNOTATION_RUN_DIGEST,
    COMPLETION_INDEX,
    CONTAINER,
    JOB_NAME_LABEL,
    build_cleanup_job,
    is_cleanup,
    job_name,
    jobs_image,
    pipeline_prefix,
    stage_objects,
)
from kondense.plan import StagePlan, decide, missing_reasons, resolve, run_digest, settle
from kondense.settings import Settings
from kondense.status import FAILED, PROGRESSING, READY, SUCCEEDED, set_condition, summarize
from kondense.validation import parse

log = logging.getLogger("kondense.reconcile")


@dataclass(frozen=True)
class Observed:
    """What a Job and its pods say about one stage attempt."""

    state: str  # Pending | Running | Succeeded | Failed
    reason: str
    message: str = ""
    attempts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    summary: api.Summary | None = None


def _condition(obj: dict, type_: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def _terminated(pod: dict) -> dict | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER and (cs.get("state") or {}).get("terminated"):
            return cs["state"]["terminated"]
    return None


IMAGE_WAITING = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName")
CONFIG_WAITING = ("CreateContainerConfigError", "CreateContainerError")
# Pending reasons that no waiting fixes by itself: after resources.pendingTimeoutSeconds they fail the stage.
STUCK = (Reason.UNSCHEDULABLE, Reason.CONFIG_ERROR, Reason.POD_CREATE_FAILED, Reason.IMAGE_PULL_FAILED)


def _stuck(pod: dict) -> tuple[str, str] | None:
    """(reason, the server's message) when a pod cannot start: unschedulable, image, config."""
    status = pod.get("status") or {}
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        detail = f"{waiting.get('reason')}: {waiting.get('message') or ''}".rstrip(": ")
        if waiting.get("reason") in IMAGE_WAITING:
            return Reason.IMAGE_PULL_FAILED, detail
        if waiting.get("reason") in CONFIG_WAITING:
            return Reason.CONFIG_ERROR, detail
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return Reason.UNSCHEDULABLE, c.get("message") or "no node fits the pod"
    return None


def _starting(pod: dict) -> str:
    """What a pod that is not running yet is doing (ContainerCreating, being scheduled)."""
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        if reason := ((cs.get("state") or {}).get("waiting") or {}).get("reason"):
            return f"pod {pod['metadata']['name']}: {reason}"
    scheduled = any(c.get("type") == "PodScheduled" and c.get("status") == "True" for c in status.get("conditions") or [])
    return f"pod {pod['metadata']['name']}: {'starting' if scheduled else 'waiting to be scheduled'}"


def completion_index(pod: dict) -> int | None:
    """A pod's index in an Indexed Job (a label since Kubernetes 1.28, an annotation always);
    None for the pod of a plain Job."""
    meta = pod["metadata"]
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    raw = labels.get(COMPLETION_INDEX) or annotations.get(COMPLETION_INDEX)
    return int(raw) if raw is not None and raw.isdigit() else None


def _latest_terminations(pods: list[dict]) -> list[tuple[dict, dict]]:
    """(pod, terminated state) of the newest terminated pod of each completion index, by index.

    Older pods of an index were retried by the Job controller and speak no more. A plain Job's
    pods share the index None: what is left is its newest terminated pod.
    """
    latest: dict[int | None, tuple[dict, dict]] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
        if term := _terminated(pod):
            latest[completion_index(pod)] = (pod, term)
    return [latest[i] for i in sorted(latest, key=lambda i: -1 if i is None else i)]


def _cause_first(entry: tuple[dict, dict]) -> tuple[bool, str, int]:
    pod, term = entry
    stopped = bool(pod["metadata"].get("deletionTimestamp"))
    return stopped, term.get("finishedAt") or "", completion_index(pod) or 0


def deciding_termination(pods: list[dict], complete: bool) -> dict | None:
    """The container termination whose message speaks for a Job: its summary, exit code, reason.

    A plain Job: its newest terminated pod. An Indexed Job (a stage on several nodes):
    - complete: the pod whose summary names the published artifact, index 0 first. Only the
      worker of global rank 0 publishes, and which pod holds it is the rendezvous' choice;
    - otherwise, the pod that failed first among those that failed on their own: when one node's
      worker dies, the others fail after it for want of their peer, or are stopped (deleted) by
      the Job controller as the Job fails, and neither says why.
    """
    latest = _latest_terminations(pods)
    if not latest:
        return None
    if complete:
        for _, term in latest:
            summary = events.parse_summary(term.get("message") or "")
            if summary is not None and summary.artifact is not None:
                return term
        return latest[0][1]
    failed = [entry for entry in latest if int(entry[1].get("exitCode") or 0) != 0]
    return min(failed, key=_cause_first)[1] if failed else latest[0][1]


def observe_job(job: dict, pods: list[dict], create_error: str | None = None) -> Observed:
    """Pure: a Job and its pods -> the stage's state, reason and summary.

    A stage runs when one of its pods runs. Until then it is Pending with what holds it: Queued
    (suspended for Kueue), Unschedulable, ConfigError (a missing Secret), ImagePullFailed,
    PodCreateFailed (`create_error`: the Job controller's FailedCreate event) or Starting.
    """
    status = job.get("status") or {}
    attempts = int(status.get("succeeded") or 0) + int(status.get("failed") or 0) + int(status.get("active") or 0)
    started = status.get("startTime")
    pods = sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")
    term = deciding_termination(pods, complete=_condition(job, "Complete") is not None)
    summary = events.parse_summary(term.get("message") or "") if term else None

    if _condition(job, "Complete"):
        return Observed("Succeeded", Reason.SUCCEEDED, "", attempts, started, status.get("completionTime"), summary)
    failed = _condition(job, "Failed")
    if failed:
        reason = failed.get("reason") or Reason.ERROR
        if reason == "DeadlineExceeded":
            reason = Reason.DEADLINE_EXCEEDED
        elif term is not None:
            if term.get("reason") == "OOMKilled":
                reason = Reason.OOM_KILLED
            elif summary is not None:
                reason = summary.reason
            else:
                reason = outcome_for_exit(int(term.get("exitCode") or 1)).reason
        elif reason in ("BackoffLimitExceeded", "PodFailurePolicy"):
            reason = Reason.BACKOFF_LIMIT_EXCEEDED
        detail = summary.message if summary and summary.message else failed.get("message") or ""
        hint = HINTS.get(reason)
        message = f"{detail} (hint: {hint})" if hint else detail
        finished = failed.get("lastTransitionTime")
        return Observed("Failed", reason, message.strip(), attempts, started, finished, summary)
    if job.get("spec", {}).get("suspend"):
        return Observed("Pending", Reason.QUEUED, "the Job is suspended, waiting for admission (Kueue)", attempts, started)
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp") and _terminated(p) is None]
    if any((p.get("status") or {}).get("phase") == "Running" for p in live):
        return Observed("Running", Reason.RUNNING, "", attempts, started)
    for pod in reversed(live):  # the newest pod speaks for the Job
        if stuck := _stuck(pod):
            reason, detail = stuck
            return Observed("Pending", reason, f"{detail} (hint: {HINTS[reason]})", attempts, started)
    if live:
        return Observed("Pending", Reason.STARTING, _starting(live[-1]), attempts, started)
    if create_error:
        return Observed("Pending", Reason.POD_CREATE_FAILED, f"{create_error} (hint: {HINTS[Reason.POD_CREATE_FAILED]})",
                        attempts, started)
    if attempts:  # between a failed pod and its retry
        return Observed("Running", Reason.RUNNING, "", attempts, started)
    return Observed("Pending", Reason.PENDING, "", attempts, started)


POD_CREATE_POLL_SECONDS = 10.0  # a Job without pods is looked at again (its FailedCreate events)
POD_CREATE_GRACE_SECONDS = 5.0  # ... this long after the Job controller started it: until then its
# pods are on their way. A Job it has not started yet (no startTime) has no FailedCreate events to read.
EDIT_DEFERRED = (
    "The edited resources/image apply from the next attempt: this Job keeps running as it was created "
    "(delete it to apply them now)."
)


def _finished(job: dict) -> bool:
    return _condition(job, "Complete") is not None or _condition(job, "Failed") is not None


def _sooner(current: float | None, delay: float) -> float:
    return delay if current is None else min(current, delay)


def _seconds_between(start: str | None, end: str) -> float | None:
    """Seconds from one RFC 3339 time to another; None when the first is unknown."""
    if not start:
        return None
    parse_time = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return (parse_time(end) - parse_time(start)).total_seconds()


@dataclass
class Outcome:
    """What reconcile did and wants said: the new status and the events to record."""

    status: api.PipelineStatus
    changed: bool
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    retry_after: float | None = None  # a Job the API server refused for now: reconcile again then


def invalid(body: dict, error: InvalidSpec, now: str) -> Outcome:
    """Failed/InvalidSpec with the field paths; no Job is created."""
    previous = _previous(body)
    status = summarize([], previous, body["metadata"].get("generation"), now)
    gen = body["metadata"].get("generation")
    conds = status.conditions
    for type_, value in ((READY, False), (SUCCEEDED, False), (PROGRESSING, False), (FAILED, True)):
        conds = set_condition(conds, type_, value, Reason.INVALID_SPEC, str(error), gen, now)
    status = status.model_copy(update={"conditions": conds, "stage": None, "progress": None, "stages": []})
    return Outcome(status, _changed(previous, status), events=[("Warning", Reason.INVALID_SPEC, str(error)[:1000])])


@functools.lru_cache(maxsize=1024)
def _planned(namespace: str, name: str, spec_json: str) -> tuple[api.PipelineSpec, tuple[StagePlan, ...]]:
    """A pipeline's parsed spec and its plans, by the spec's content (never mutated by callers).
    Every event of a pipeline's Jobs and pods reconciles it again, mostly with the same spec:
    parsing and planning were half of a reconcile's CPU. Raises InvalidSpec (never cached)."""
    doc = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name, "namespace": namespace},
           "spec": json.loads(spec_json)}
    spec = parse(doc).spec
    return spec, tuple(resolve(spec, namespace, name))


def _pipeline_of(body: dict) -> api.CompressionPipeline:
    """The pipeline in a watched body (its status aside); raises InvalidSpec."""
    return parse({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body})


def _pods_by_job(pods: list[dict]) -> dict[str, list[dict]]:
    """Pods grouped by the Job that owns them (the Job controller's job-name labels)."""
    by_job: dict[str, list[dict]] = {}
    for pod in pods:
        labels = pod["metadata"].get("labels") or {}
        if owner := labels.get("job-name") or labels.get(JOB_NAME_LABEL):
            by_job.setdefault(owner, []).append(pod)
    return by_job


def _previous(body: dict) -> api.PipelineStatus | None:
    """The status as last written (None when absent or written by something else)."""
    try:
        return api.PipelineStatus.model_validate(body["status"]) if body.get("status") else None
    except ValueError:
        return None


def _changed(previous: api.PipelineStatus | None, new: api.PipelineStatus) -> bool:
    return previous is None or previous.dump() != new.dump()


def reconcile(
    body: dict,
    jobs: list[dict],
    pods: list[dict],
    settings: Settings,
    now: str,
    create: Callable[[dict], bool],
    delete_job: Callable[[str, str], None],
    adopt: Callable[[dict], None],
    progress: Mapping[str, str] | None = None,
    pod_create_error: Callable[[str], str | None] = lambda job: None,
) -> Outcome:
    """Observe -> plan -> act. Raises InvalidSpec for a spec that cannot run.

    `progress` is the last progress of running stages, by stage name, as read from their logs.
    `pod_create_error(job)` is the Job controller's last FailedCreate message for a Job that has
    no pod (no watch carries it; it is asked only then). `delete_job(name, propagation)`.
    """
    meta = body["metadata"]
    name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation")
    spec, plans = _planned(namespace, name, json.dumps(body.get("spec"), sort_keys=True))
    jobs_image(spec, settings)  # InvalidSpec for an image that is not allowed, before anything is created
    previous = _previous(body)
    old = {s.name: s for s in previous.stages} if previous else {}

    # Observe: the Job of each stage's CURRENT digest, and superseded ones.
    retry = (meta.get("annotations") or {}).get(ANNOTATION_RETRY)
    runs = {p.name: run_digest(spec, p, retry) for p in plans}
    # The stages status recorded as failed (a Job's failure reaches status one reconcile later): a
    # stage that may run without some inputs runs without those, under its own digest (plan.settle).
    failures = {
        p.name: f"{s.reason}: {s.message}" if s.message else str(s.reason)
        for p in plans
        if (s := old.get(p.name)) and s.state == "Failed" and s.input_digest == p.input_digest
        and s.run_digest in (None, runs[p.name])
    }
    plans = settle(plans, failures, spec.storage.uri, namespace, name)
    reasons = missing_reasons(plans, failures)
    current = {job_name(name, p): p for p in plans}
    by_job = _pods_by_job(pods)
    observed: dict[str, Observed] = {}
    deleted, evs, replacing, retry_after = [], [], set(), None

    def stop(jname: str, why: str, propagation: str = "Background") -> None:
        delete_job(jname, propagation)
        deleted.append(jname)
        evs.append(("Normal", "JobDeleted", f"deleted Job {jname}: {why}"[:1000]))

    for job in jobs:
        if is_cleanup(job):
            continue
        jmeta = job["metadata"]
        jname, annotations = jmeta["name"], jmeta.get("annotations") or {}
        plan = current.get(jname)
        if plan is None or annotations.get(ANNOTATION_DIGEST) != plan.input_digest:
            if (job.get("status") or {}).get("active") and not jmeta.get("deletionTimestamp"):
                stop(jname, "superseded by an edit of the pipeline's spec")  # stop wasting the GPU
            continue
        if jmeta.get("deletionTimestamp"):  # replaced: its pods go first, then a new Job starts
            replacing.add(plan.name)
            observed[plan.name] = Observed("Pending", Reason.REPLACING, f"waiting for the old Job {jname} to go")
            continue
        pods_of_job = by_job.get(jname, [])
        create_error = None
        started = (job.get("status") or {}).get("startTime")  # set by the Job controller's first sync
        if started and not pods_of_job and not job.get("spec", {}).get("suspend") and not _finished(job):
            age = _seconds_between(started, now)
            if age is not None and age < POD_CREATE_GRACE_SECONDS:  # its pods are normally on their way
                retry_after = _sooner(retry_after, POD_CREATE_GRACE_SECONDS - age)
            else:  # the Job says nothing when it fails to create them; its FailedCreate events do
                create_error = pod_create_error(jname)
                retry_after = _sooner(retry_after, POD_CREATE_POLL_SECONDS)
        o = observe_job(job, pods_of_job, create_error)
        shaped_by = annotations.get(ANNOTATION_RUN_DIGEST)
        if shaped_by is not None and shaped_by != runs[plan.name] and o.state != "Succeeded":
            if o.state in ("Failed", "Pending"):  # a fix of what the hint named, or a Job not started yet
                why = "retry requested" if o.state == "Failed" else "rebuilt with the edited resources/image"
                stop(jname, f"stage {plan.name} {why}", propagation="Foreground")
                replacing.add(plan.name)
                observed[plan.name] = Observed("Pending", Reason.REPLACING, f"waiting for the old Job {jname} to go")
                continue
            o = replace(o, message=f"{o.message} {EDIT_DEFERRED}".strip())
        if o.state == "Pending" and o.reason in (*STUCK, Reason.QUEUED):
            limit = plan.resources.pending_timeout_seconds
            waited = _seconds_between(jmeta.get("creationTimestamp"), now)
            if limit and waited is not None:
                if waited >= limit and o.reason == Reason.QUEUED:  # Kueue decides; say what may be wrong
                    queue = plan.resources.queue_name
                    o = replace(o, message=f"suspended for more than {limit}s waiting for admission: is Kueue "
                                f"installed, and does the LocalQueue {queue!r} exist in namespace {namespace}?")
                elif waited >= limit:
                    stop(jname, f"stage {plan.name} pending for more than {limit}s ({o.reason})")
                    o = replace(o, state="Failed", message=f"pending for more than {limit}s: {o.message}",
                                finished_at=now)
                else:
                    retry_after = _sooner(retry_after, limit - waited + 1)
        observed[plan.name] = o

    committed, running, failed = set(), set(), set()
    for p in plans:
        o = observed.get(p.name)
        prior = old.get(p.name)
        recorded = None
        if o is None and prior and prior.input_digest == p.input_digest:
            recorded = prior.state
            if recorded == "Failed" and prior.run_digest not in (None, runs[p.name]):
                recorded = None  # failed with other resources/image, or before the retry token: run again
        if recorded == "Succeeded":
            committed.add(p.name)  # Job garbage-collected after success: status is the record
        elif recorded == "Failed":
            failed.add(p.name)  # Job garbage-collected after failure, or refused as invalid: a spec edit retries
        elif o is not None and o.state == "Succeeded":
            committed.add(p.name)
        elif o is not None and o.state == "Failed":
            failed.add(p.name)
        elif o is not None:
            running.add(p.name)

    # Act: start every stage whose inputs are done.
    decision = decide(plans, committed, running, failed)
    created, refused = [], set()
    for stage_name in decision.start:
        plan = next(p for p in plans if p.name == stage_name)
        *companions, job = stage_objects(spec, plans, plan, namespace, name, settings, reasons)
        job["metadata"].setdefault("annotations", {})[ANNOTATION_RUN_DIGEST] = runs[plan.name]
        try:
            for obj in companions:  # a multi-node stage's Service, before the Job that needs it
                adopt(obj)
                create(obj)
            adopt(job)
            if create(job):
                created.append(plan.name)
        except ApiRejected as e:  # the stage says why it has no Job; the others go on
            refused.add(plan.name)
            if e.retry_after is None:
                observed[plan.name] = Observed("Failed", e.reason, str(e))
            else:
                observed[plan.name] = Observed("Pending", e.reason, str(e))
                retry_after = min(retry_after or e.retry_after, e.retry_after)
            continue
        # What the Job's own watch event will say, so that event changes nothing more in status.
        observed[plan.name] = observe_job(job, [])
    if refused_for_good := {n for n in refused if observed[n].state == "Failed"}:
        # What waits on a stage the API server refused for good cannot run: say so now, as the
        # next reconcile would (no event may come to start one).
        started = set(decision.start) - refused_for_good
        decision = replace(decision, blocked=decide(plans, committed, running | started, failed | refused_for_good).blocked)

    # Report.
    stages = []
    report, gate = previous.report if previous else None, None
    for p in plans:
        st = _stage_status(
            p, observed.get(p.name), old.get(p.name), p.name in committed | failed, p.name in decision.blocked
        )
        if p.name in observed and p.name not in refused:
            st.job = job_name(name, p)
        if st is not old.get(p.name):  # a record kept from before keeps the digest it ran with
            st.run_digest = runs[p.name]
        if st.state == "Running" and progress:
            st.progress = progress.get(p.name)
        stages.append(st)
        before = old.get(p.name)
        moved = before is None or before.state != st.state or before.input_digest != st.input_digest
        if p.name in created:
            evs.append(("Normal", "StageStarted", f"stage {p.name}: created Job {job_name(name, p)}"))
        elif p.name in refused:
            if before is None or (before.state, before.reason) != (st.state, st.reason):
                evs.append(("Warning", st.reason or Reason.ERROR, f"stage {p.name}: {st.message}"[:1000]))
        elif moved and st.state != "Pending":  # a stage waiting for its inputs is not news
            evs.append(_event(st))
        elif st.state == "Pending" and st.reason in (*STUCK, Reason.QUEUED) and st.message and (
            before is None or (before.reason, before.message) != (st.reason, st.message)
        ):
            evs.append(("Warning", st.reason, f"stage {p.name} pending: {st.message}"[:1000]))
        if EDIT_DEFERRED in (st.message or "") and EDIT_DEFERRED not in (before.message or "" if before else ""):
            evs.append(("Normal", "EditDeferred", f"stage {p.name}: {EDIT_DEFERRED}"))
        summary = observed[p.name].summary if p.name in observed else None
        if p.kind == "evaluate" and summary is not None:
            if summary.report:
                report = summary.report
            if summary.reason == Reason.QUALITY_GATE_FAILED:
                gate = (False, summary.message)
            elif st.state == "Succeeded":
                gate = (True, "all quality gates passed")
    status = summarize(stages, previous, generation, now, report, gate)
    return Outcome(status, _changed(previous, status), created, deleted, evs, retry_after)


@dataclass
class Cleanup:
    """Where deleting a pipeline's artifacts stands (spec.storage.deletionPolicy: Delete)."""

    state: str  # Waiting | Done | Failed
    message: str
    events: list[tuple[str, str, str]] = field(default_factory=list)


def cleanup(
    body: dict,
    jobs: list[dict],
    pods: list[dict],
    settings: Settings,
    create: Callable[[dict], bool],
    stop_job: Callable[[str], None],
    adopt: Callable[[dict], None],
) -> Cleanup:
    """Stop the stage Jobs, then run the cleanup Job, then let the pipeline go. Idempotent."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    try:
        pipeline = _pipeline_of(body)
    except InvalidSpec as e:
        return Cleanup("Failed", f"artifacts kept: the spec is invalid, so where they are is unknown: {e}")
    try:
        image = jobs_image(pipeline.spec, settings)
    except InvalidSpec as e:
        return Cleanup("Failed", f"artifacts kept: the cleanup Job's image is not allowed: {e}")
    unfinished = [
        j for j in jobs
        if not is_cleanup(j) and observe_job(j, []).state not in ("Succeeded", "Failed")
    ]
    if unfinished:  # a stage still running could publish after the cleanup
        for job in unfinished:
            if not job["metadata"].get("deletionTimestamp"):
                stop_job(job["metadata"]["name"])
        return Cleanup("Waiting", f"stopping {len(unfinished)} stage Jobs before deleting the artifacts")
    job = build_cleanup_job(name, namespace, pipeline.spec.storage, image, settings)
    jname = job["metadata"]["name"]
    existing = next((j for j in jobs if j["metadata"]["name"] == jname), None)
    if existing is None:
        adopt(job)
        create(job)
        return Cleanup("Waiting", f"deleting the artifacts with Job {jname}",
                       [("Normal", "CleanupStarted", f"deleting the artifacts with Job {jname}")])
    o = observe_job(existing, _pods_by_job(pods).get(jname, []))
    if o.state == "Succeeded":
        detail = o.summary.message if o.summary else "artifacts deleted"
        return Cleanup("Done", detail, [("Normal", "ArtifactsDeleted", detail)])
    if o.state == "Failed":
        detail = f"artifacts kept: cleanup Job {jname} failed: {o.reason}: {o.message}"
        return Cleanup("Failed", detail, [("Warning", o.reason, detail[:1000])])
    return Cleanup("Waiting", f"deleting the artifacts with Job {jname}")


def artifacts_prefix(body: dict) -> str:
    """Where a pipeline's artifacts lie, for messages; the spec may be invalid."""
    meta = body["metadata"]
    try:
        return pipeline_prefix(_pipeline_of(body).spec.storage, meta["namespace"], meta["name"])
    except InvalidSpec:
        return f"spec.storage.uri of {meta['namespace']}/{meta['name']} (the spec is invalid)"


def _stage_status(p: StagePlan, o: Observed | None, prior: api.StageStatus | None, finished: bool, blocked: bool) -> api.StageStatus:
    if o is None and finished and prior is not None:
        return prior
    st = api.StageStatus(name=p.name, input_digest=p.input_digest)
    if o is None:
        if blocked:
            st.state, st.reason, st.message = "Skipped", Reason.WAITING_FOR_INPUTS, "an input stage failed"
        else:
            st.state, st.reason = "Pending", Reason.WAITING_FOR_INPUTS
        return st
    st.state, st.reason, st.message = o.state, o.reason, o.message or None  # type: ignore[assignment]
    st.attempts, st.started_at, st.finished_at = o.attempts, o.started_at, o.finished_at
    if o.summary is not None and o.state == "Succeeded":
        st.artifact, st.metrics = o.summary.artifact, o.summary.metrics or None  # no empty `Metrics:` in describe
    return st


def _event(st: api.StageStatus) -> tuple[str, str, str]:
    kind = "Warning" if st.state == "Failed" else "Normal"
    text = f"stage {st.name} {st.state.lower()}"
    if st.message:
        text += f": {st.message}"
    return kind, f"Stage{st.state}", text[:1000]
