"""kopf glue: a few lines per handler; the logic lives in reconcile.py, plan.py and manifests.py.

Jobs, pods and pipelines are kept in kopf indexes (in-memory, fed by the watches), so a
reconcile reads its children from memory: no list calls per pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import kopf
from kubernetes import client, config

from kondense import api, events, metrics, reconcile
from kondense.errors import ApiRejected, InvalidSpec, Reason
from kondense.kube import Kube
from kondense.manifests import ANNOTATION_RETRY, CONTAINER, LABEL_PIPELINE, LABEL_STAGE
from kondense.settings import PREFIX, Settings
from kondense.status import now_rfc3339

log = logging.getLogger("kondense.handlers")

# Set once by configure(); handlers read them.
SETTINGS: Settings = Settings()
KUBE: Kube | None = None
CHILDREN = {LABEL_PIPELINE: kopf.PRESENT}
# The resources of the children's watches. kopf applies a handler's `labels=` itself, to every
# object the watch brought in; watch_only_children() has the API server send only the children.
CHILD_RESOURCES = (("batch", "v1", "jobs"), ("v1", "pods"))
DELETION_POLICY = "spec.storage.deletionPolicy"

# The operator is the only writer of status: what it wrote last is the newest status, even
# before the watch delivers it back. Reconciles of one pipeline run one at a time.
_WRITTEN: dict[tuple[str, str], dict] = {}
_LOCKS: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
# Reconciles that a Job/pod event started and the API server refused for now: retried later on
# the operator's loop (kopf retries its change handlers itself, but not its event handlers).
_LOOP: asyncio.AbstractEventLoop | None = None
_REQUEUED: set[tuple[str, str]] = set()
# The retry annotation of each pipeline as its last watch event showed it, and the indexes that
# a reconcile started outside a handler reads (set at startup).
_RETRY_TOKENS: dict[tuple[str, str], str | None] = {}
_INDEXES: tuple[kopf.Index, kopf.Index, kopf.Index] | None = None
# The metadata.generation each pipeline was last reconciled for (see pipeline_event).
_GENERATIONS: dict[tuple[str, str], int | None] = {}
MAX_REQUEUE_DELAY = 300.0
FIRST_RETRY_DELAY = 10.0  # after an unexpected error, doubling up to MAX_REQUEUE_DELAY
# Progress of running stages, (namespace, pipeline) -> stage -> "120/500 steps, ETA 3:10", read
# from the tails of their pods' logs every SETTINGS.progress_seconds (no watch carries it).
_PROGRESS: dict[tuple[str, str], dict[str, str]] = {}
_PROGRESS_TASK: asyncio.Task | None = None
CLEANUP_POLL_SECONDS = 5.0
RETRY_DELAY = 0.5  # after the retry annotation's event, once the index holds the new body


def configure(settings: Settings, api_client: client.ApiClient | None = None, kube: Kube | None = None) -> None:
    """Called once at startup (and by tests with an explicit client, or a Kube with short delays)."""
    global SETTINGS, KUBE
    SETTINGS = settings
    if kube is not None:
        KUBE = kube
        return
    if api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api_client = client.ApiClient()
    api_client.configuration.connection_pool_maxsize = max(api_client.configuration.connection_pool_maxsize, 32)
    KUBE = Kube(api_client)


@kopf.on.startup()
async def startup(
    settings: kopf.OperatorSettings, pipelines: kopf.Index, jobs_by_pipeline: kopf.Index, pods_by_pipeline: kopf.Index,
    **_,
) -> None:
    global _LOOP, _PROGRESS_TASK, _INDEXES
    _LOOP = asyncio.get_running_loop()
    _INDEXES = (pipelines, jobs_by_pipeline, pods_by_pipeline)
    metrics.PIPELINES.source = lambda: (body for key in list(pipelines) for body in list(pipelines.get(key, [])))
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.posting.level = logging.WARNING  # kopf's own per-handler chatter stays out of events
    settings.execution.max_workers = 16
    watch_only_children(settings)
    if KUBE is None:
        configure(Settings.from_env())
    if SETTINGS.progress_seconds > 0:
        _PROGRESS_TASK = asyncio.create_task(_follow_progress(pipelines, jobs_by_pipeline, pods_by_pipeline))


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: kondense reconciles by metadata.generation (pipeline_event), not by kopf's
    diffs, so kopf's `last-handled-configuration` annotation, a patch of every pipeline after
    its creation and after every spec edit, is never written. Every event reads as unchanged
    (kopf's causes are then only DELETE, for delete_artifacts, and no-ops); deletion needs no
    diff, only the finalizer and deletionTimestamp.

    The essence kopf compares holds only the fields a change handler's filter reads
    (FILTERED), not a deep copy of the object, which kopf would make, and copy twice more, for
    every event of every pipeline, Job and pod."""

    FILTERED = DELETION_POLICY  # delete_artifacts' field=

    def build(self, *, body: kopf.Body, extra_fields: object = None) -> kopf.BodyEssence:
        keys = self.FILTERED.split(".")
        value: object = body
        for key in keys:
            value = value.get(key) if isinstance(value, Mapping) else None
        essence: dict = {}
        if value is not None:
            *path, last = keys
            leaf = essence
            for key in path:
                leaf = leaf.setdefault(key, {})
            leaf[last] = value
        return essence  # type: ignore[return-value]

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence:
        return self.build(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def started() -> bool:
    """kopf has run the startup handler: the indexes exist and reconciles can run."""
    return _INDEXES is not None


def watch_only_children(settings: kopf.OperatorSettings) -> None:
    """List and watch Jobs and pods with labelSelector=kondense.io/pipeline, the filter of their
    handlers (CHILDREN): without it every pod of the watched namespaces comes over the wire and
    is decoded, only for kopf to drop it. An object that loses the label leaves the watch as a
    DELETED event, as if it were gone; 410 Gone, bookmarks and reconnects stay kopf's, with the
    selector on every list and watch it makes."""
    for resource in CHILD_RESOURCES:
        settings.watching.label_selectors[resource] = LABEL_PIPELINE


@kopf.on.cleanup()
async def cleanup(**_) -> None:
    """Stop the progress follower, or kopf waits 5 s for it as a hung task at every exit."""
    global _PROGRESS_TASK
    if _PROGRESS_TASK is not None:
        _PROGRESS_TASK.cancel()
        _PROGRESS_TASK = None


# -- indexes: (namespace, pipeline) -> bodies ----------------------------------------------
def _key(namespace: str, labels: dict) -> tuple[str, str]:
    return namespace, labels[LABEL_PIPELINE]


def _slim(body: kopf.Body, spec: tuple[str, ...] | None) -> dict:
    """What reconciles read of an object: no managedFields, and of a child's spec only `spec`'s
    keys (a Job's pod template, with its StageRun annotation, is most of its size)."""
    out = {k: body[k] for k in ("apiVersion", "kind", "status") if k in body}
    out["metadata"] = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
    whole = dict(body.get("spec") or {})
    out["spec"] = whole if spec is None else {k: whole[k] for k in spec if k in whole}
    return out


@kopf.index("batch", "v1", "jobs", labels=CHILDREN)
def jobs_by_pipeline(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return {_key(namespace, labels): _slim(body, spec=("suspend",))}


@kopf.index("", "v1", "pods", labels=CHILDREN)
def pods_by_pipeline(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return {_key(namespace, labels): _slim(body, spec=())}


@kopf.index(api.GROUP, api.VERSION, api.PLURAL)
def pipelines(namespace: str, name: str, body: kopf.Body, annotations: kopf.Annotations, **_) -> dict:
    key, token = (namespace, name), annotations.get(ANNOTATION_RETRY)
    if key in _RETRY_TOKENS and _RETRY_TOKENS[key] != token:
        _retry_requested(key)
    _RETRY_TOKENS[key] = token
    return {key: _slim(body, spec=None)}


def _retry_requested(key: tuple[str, str]) -> None:
    """The retry annotation changed. kopf's change handlers cannot see it (kopf leaves every
    annotation of its storage's domain, kondense.io, out of the diffs it compares), but every
    watch event passes through this index: reconcile once it is updated, on the loop."""
    if _LOOP is None or _INDEXES is None:
        return
    log.info("%s/%s: retry requested (%s)", *key, ANNOTATION_RETRY)
    indexes = _INDEXES
    _LOOP.call_soon_threadsafe(lambda: _LOOP.call_later(RETRY_DELAY, _LOOP.run_in_executor, None, _reconcile_or_requeue, key, *indexes))


def own(child: dict, owner: kopf.Body | dict) -> None:
    """The owner reference and namespace of kopf.adopt, not its copy of the owner's labels: a
    pipeline's labels, Argo CD's tracking label app.kubernetes.io/instance among them, would make
    its Jobs look like objects of the pipeline's Argo CD application (shown out of sync, or pruned)."""
    kopf.append_owner_reference(child, owner=owner)
    kopf.adjust_namespace(child, namespace=owner["metadata"]["namespace"])


@dataclass(frozen=True)
class Result:
    invalid: InvalidSpec | None = None  # reported on the pipeline as Failed/InvalidSpec
    retry_after: float | None = None  # a Job the API server refused for now


def _reconcile(body: kopf.Body | dict, jobs: kopf.Index, pods: kopf.Index) -> Result:
    """Reconcile one pipeline. Raises ApiRejected when its status could not be written."""
    assert KUBE is not None, "configure() was not called"
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    with _LOCKS[(namespace, name)]:
        current = dict(body)
        if (namespace, name) in _WRITTEN:
            current["status"] = _WRITTEN[(namespace, name)]
        started, result = time.perf_counter(), "error"
        try:
            done = _reconcile_locked(current, jobs, pods)
            result = "invalid" if done.invalid else "retry" if done.retry_after is not None else "ok"
            return done
        except ApiRejected:
            result = "rejected"
            raise
        finally:
            metrics.RECONCILE_DURATION.labels(result).observe(time.perf_counter() - started)


def _reconcile_locked(body: dict, jobs: kopf.Index, pods: kopf.Index) -> Result:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    now = now_rfc3339()
    try:
        outcome = reconcile.reconcile(
            dict(body),
            list(jobs.get((namespace, name), [])),
            list(pods.get((namespace, name), [])),
            SETTINGS,
            now,
            create=KUBE.create,
            delete_job=lambda job, propagation: KUBE.delete_job(namespace, job, propagation),
            adopt=lambda child: own(child, body),
            progress=_PROGRESS.get((namespace, name)),
            pod_create_error=lambda job: KUBE.pod_create_error(namespace, job),
        )
    except InvalidSpec as e:
        _apply(body, reconcile.invalid(dict(body), e, now))
        return Result(invalid=e)
    _apply(body, outcome)
    return Result(retry_after=outcome.retry_after)


def _apply(body, outcome: reconcile.Outcome) -> None:
    assert KUBE is not None
    meta = body["metadata"]
    for type_, reason, message in outcome.events:
        KUBE.event(body, type_, reason, message)
    if outcome.changed:
        doc = outcome.status.dump()
        # Fields that disappeared are nulled explicitly (a merge patch keeps absent keys).
        for key in ("stage", "progress", "report"):
            doc.setdefault(key, None)
        KUBE.patch_status(meta["namespace"], meta["name"], doc)
        written = _WRITTEN[(meta["namespace"], meta["name"])] = outcome.status.dump()
        metrics.stage_transitions(body.get("spec") or {}, body.get("status"), written)  # once written


def _requeue(key: tuple[str, str], delay: float, pipelines: kopf.Index, jobs: kopf.Index, pods: kopf.Index) -> None:
    """Reconcile `key` again in `delay` seconds (once, however often it is asked), backing off."""
    if _LOOP is None or key in _REQUEUED:
        return
    _REQUEUED.add(key)
    log.info("Reconciling %s/%s again in %.0fs", *key, delay)

    def again() -> None:
        _REQUEUED.discard(key)
        _reconcile_or_requeue(key, pipelines, jobs, pods, min(delay * 2, MAX_REQUEUE_DELAY))

    _LOOP.call_soon_threadsafe(lambda: _LOOP.call_later(delay, _LOOP.run_in_executor, None, again))


def _reconcile_or_requeue(
    key: tuple[str, str], pipelines: kopf.Index, jobs: kopf.Index, pods: kopf.Index, backoff: float = 1.0
) -> Result | None:
    """_reconcile_key, where an unexpected error is logged and tried again later, backing off (as
    kopf retries a failed change handler): no event may come to try it again otherwise."""
    try:
        return _reconcile_key(key, pipelines, jobs, pods, backoff)
    except Exception:  # noqa: BLE001 - retried below; nothing else awaits this call
        delay = max(backoff, FIRST_RETRY_DELAY)
        log.exception("Reconciling %s/%s failed; trying again in %.0fs", *key, delay)
        _requeue(key, delay, pipelines, jobs, pods)
        return None


def _reconcile_key(
    key: tuple[str, str], pipelines: kopf.Index, jobs: kopf.Index, pods: kopf.Index, backoff: float = 1.0
) -> Result | None:
    """Reconcile the pipeline `key` as the index holds it; requeue what the API server refused."""
    result = None
    for parent in list(pipelines.get(key, [])):  # a live index: the loop may change it meanwhile
        if parent["metadata"].get("deletionTimestamp"):
            continue
        try:
            result = _reconcile(parent, jobs, pods)  # an invalid spec is reported on the pipeline
        except ApiRejected as e:
            log.warning("%s/%s: %s", *key, e)
            _requeue(key, max(backoff, e.retry_after or 0), pipelines, jobs, pods)
        else:
            if result.retry_after is not None:
                _requeue(key, max(backoff, result.retry_after), pipelines, jobs, pods)
    return result


async def _follow_progress(pipelines: kopf.Index, jobs: kopf.Index, pods: kopf.Index) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(SETTINGS.progress_seconds)
        try:
            await loop.run_in_executor(None, poll_progress, pipelines, jobs, pods)
        except Exception:  # noqa: BLE001 - the next round tries again
            log.exception("Reading the stages' progress failed")


def poll_progress(pipelines: kopf.Index, jobs: kopf.Index, pods: kopf.Index) -> None:
    """Read the log tail of every running stage pod; reconcile the pipelines whose progress moved."""
    assert KUBE is not None
    for key in list(pods):
        running: dict[str, str] = {}
        for pod in pods.get(key, []):
            labels = pod["metadata"].get("labels") or {}
            stage = labels.get(LABEL_STAGE)
            if stage is None or (pod.get("status") or {}).get("phase") != "Running":
                continue
            text = KUBE.log_tail(pod["metadata"]["namespace"], pod["metadata"]["name"], CONTAINER)
            if text and (event := events.last_progress(text)):
                running[stage] = events.describe(event)
        if running != _PROGRESS.get(key, {}):
            if running:
                _PROGRESS[key] = running
            else:
                _PROGRESS.pop(key, None)
            _reconcile_key(key, pipelines, jobs, pods)


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
def pipeline_event(
    type: str | None, body: kopf.Body, namespace: str, name: str,
    pipelines: kopf.Index, jobs_by_pipeline: kopf.Index, pods_by_pipeline: kopf.Index, **_,
) -> None:
    """Reconcile a pipeline at each new generation: its creation, a spec edit, and its first
    sight after the operator starts (or takes over as leader). Its own status writes and its
    annotations leave the generation as it was; the retry annotation is seen by the index."""
    key = (namespace, name)
    if type == "DELETED":
        forget(key)
        return
    generation = body["metadata"].get("generation")
    if body["metadata"].get("deletionTimestamp") or (key in _GENERATIONS and _GENERATIONS[key] == generation):
        return
    _GENERATIONS[key] = generation
    log.info("%s/%s: reconciling generation %s", namespace, name, generation)
    result = _reconcile_or_requeue(key, pipelines, jobs_by_pipeline, pods_by_pipeline)
    if result is not None and result.invalid is not None:  # the status says so too
        log.warning("%s/%s: invalid spec at generation %s: %s", namespace, name, generation, result.invalid)


@kopf.on.event("batch", "v1", "jobs", labels=CHILDREN)
@kopf.on.event("", "v1", "pods", labels=CHILDREN)
def child_changed(
    namespace: str, labels: kopf.Labels, pipelines: kopf.Index, jobs_by_pipeline: kopf.Index, pods_by_pipeline: kopf.Index, **_
) -> None:
    """A Job or pod of a pipeline changed: recompute the parent's status and start what can start."""
    _reconcile_or_requeue(_key(namespace, labels), pipelines, jobs_by_pipeline, pods_by_pipeline)


@kopf.on.delete(api.GROUP, api.VERSION, api.PLURAL, field=DELETION_POLICY, value="Delete")
def delete_artifacts(body: kopf.Body, jobs_by_pipeline: kopf.Index, pods_by_pipeline: kopf.Index, **_) -> None:
    """deletionPolicy: Delete. kopf holds its finalizer on such pipelines until this returns."""
    assert KUBE is not None
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        result = reconcile.cleanup(
            dict(body),
            list(jobs_by_pipeline.get((namespace, name), [])),
            list(pods_by_pipeline.get((namespace, name), [])),
            SETTINGS,
            create=KUBE.create,
            stop_job=lambda job: KUBE.delete_job(namespace, job, propagation="Foreground"),
            adopt=lambda child: own(child, body),
        )
    except ApiRejected as e:
        if e.reason != Reason.NAMESPACE_TERMINATING:
            raise kopf.TemporaryError(str(e), delay=e.retry_after or 10.0) from None
        # No Job can start in a namespace being deleted, and the finalizer would hold it forever.
        message = (
            f"artifacts kept under {reconcile.artifacts_prefix(dict(body))}: namespace {namespace} is being "
            "deleted, so no cleanup Job can run there; delete them from outside the cluster"
        )
        result = reconcile.Cleanup("Failed", message, [("Warning", "ArtifactsKept", message)])
        log.warning("%s/%s: %s", namespace, name, result.message)
    for type_, reason, message in result.events:
        KUBE.event(body, type_, reason, message)
    if result.state == "Waiting":
        raise kopf.TemporaryError(result.message, delay=CLEANUP_POLL_SECONDS)
    if result.state == "Failed":  # the pipeline goes; the artifacts stay, and the event says why
        raise kopf.PermanentError(result.message)


def forget(key: tuple[str, str]) -> None:
    """The pipeline is gone: drop what was kept of it (its Jobs go through owner references)."""
    for memory in (_WRITTEN, _LOCKS, _PROGRESS, _RETRY_TOKENS, _GENERATIONS):
        memory.pop(key, None)
    _REQUEUED.discard(key)
