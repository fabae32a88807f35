"""kopf glue: a few lines per handler; the logic lives in reconcile.py, plan.py and manifests.py.

Jobs, pods and pipelines are kept in kopf indexes (in-memory, fed by the watches), so a
reconcile reads its children from memory: no list calls per pipeline.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

import kopf
from kubernetes import client, config

from kondense import api, reconcile
from kondense.errors import InvalidSpec
from kondense.kube import Kube
from kondense.manifests import LABEL_PIPELINE
from kondense.settings import PREFIX, Settings
from kondense.status import now_rfc3339

log = logging.getLogger("kondense.handlers")

# Set once by configure(); handlers read them.
SETTINGS: Settings = Settings()
KUBE: Kube | None = None
CHILDREN = {LABEL_PIPELINE: kopf.PRESENT}

# The operator is the only writer of status: what it wrote last is the newest status, even
# before the watch delivers it back. Reconciles of one pipeline run one at a time.
_WRITTEN: dict[tuple[str, str], dict] = {}
_LOCKS: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)


def configure(settings: Settings, api_client: client.ApiClient | None = None) -> None:
    """Called once at startup (and by tests with an explicit client)."""
    global SETTINGS, KUBE
    SETTINGS = settings
    if api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api_client = client.ApiClient()
    api_client.configuration.connection_pool_maxsize = max(api_client.configuration.connection_pool_maxsize, 32)
    KUBE = Kube(api_client)


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_) -> None:
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.posting.level = logging.WARNING  # kopf's own per-handler chatter stays out of events
    settings.execution.max_workers = 16
    if KUBE is None:
        configure(Settings.from_env())


# -- indexes: (namespace, pipeline) -> bodies ----------------------------------------------
def _key(namespace: str, labels: dict) -> tuple[str, str]:
    return namespace, labels[LABEL_PIPELINE]


@kopf.index("batch", "v1", "jobs", labels=CHILDREN)
def jobs_by_pipeline(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return {_key(namespace, labels): dict(body)}


@kopf.index("", "v1", "pods", labels=CHILDREN)
def pods_by_pipeline(namespace: str, labels: kopf.Labels, body: kopf.Body, **_) -> dict:
    return {_key(namespace, labels): dict(body)}


@kopf.index(api.GROUP, api.VERSION, api.PLURAL)
def pipelines(namespace: str, name: str, body: kopf.Body, **_) -> dict:
    return {(namespace, name): dict(body)}


def _reconcile(body: kopf.Body | dict, jobs: kopf.Index, pods: kopf.Index) -> InvalidSpec | None:
    """Reconcile one pipeline; returns the InvalidSpec it reported, if any."""
    assert KUBE is not None, "configure() was not called"
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    with _LOCKS[(namespace, name)]:
        current = dict(body)
        if (namespace, name) in _WRITTEN:
            current["status"] = _WRITTEN[(namespace, name)]
        return _reconcile_locked(current, jobs, pods)


def _reconcile_locked(body: dict, jobs: kopf.Index, pods: kopf.Index) -> InvalidSpec | None:
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
            delete_job=lambda job: KUBE.delete_job(namespace, job),
            adopt=lambda child: kopf.adopt(child, owner=body),
        )
    except InvalidSpec as e:
        _apply(body, reconcile.invalid(dict(body), e, now))
        return e
    _apply(body, outcome)
    return None


def _apply(body, outcome: reconcile.Outcome) -> None:
    assert KUBE is not None
    meta = body["metadata"]
    for type_, reason, message in outcome.events:
        kopf.event(body, type=type_, reason=reason, message=message)
    if outcome.changed:
        doc = outcome.status.dump()
        # Fields that disappeared are nulled explicitly (a merge patch keeps absent keys).
        for key in ("stage", "progress", "report"):
            doc.setdefault(key, None)
        KUBE.patch_status(meta["namespace"], meta["name"], doc)
        _WRITTEN[(meta["namespace"], meta["name"])] = outcome.status.dump()


@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, field="spec")
def pipeline_changed(body: kopf.Body, jobs_by_pipeline: kopf.Index, pods_by_pipeline: kopf.Index, **_) -> None:
    if error := _reconcile(body, jobs_by_pipeline, pods_by_pipeline):
        raise kopf.PermanentError(f"invalid spec: {error}")


@kopf.on.event("batch", "v1", "jobs", labels=CHILDREN)
@kopf.on.event("", "v1", "pods", labels=CHILDREN)
def child_changed(
    namespace: str, labels: kopf.Labels, pipelines: kopf.Index, jobs_by_pipeline: kopf.Index, pods_by_pipeline: kopf.Index, **_
) -> None:
    """A Job or pod of a pipeline changed: recompute the parent's status and start what can start."""
    for parent in pipelines.get(_key(namespace, labels), []):
        if not parent["metadata"].get("deletionTimestamp"):
            _reconcile(parent, jobs_by_pipeline, pods_by_pipeline)  # an invalid spec is reported on the pipeline


@kopf.on.delete(api.GROUP, api.VERSION, api.PLURAL, optional=True)
def pipeline_deleted(namespace: str, name: str, **_) -> None:
    """Forget the pipeline; its Jobs go with it through owner references (no finalizer)."""
    _WRITTEN.pop((namespace, name), None)
    _LOCKS.pop((namespace, name), None)
