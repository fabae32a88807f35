"""kopf glue: a few lines per handler; the logic lives in reconcile.py, plan.py and manifests.py."""

from __future__ import annotations

import logging

import kopf
from kubernetes import client, config

from kondense import api, reconcile
from kondense.errors import InvalidSpec
from kondense.kube import Kube
from kondense.manifests import LABEL_PIPELINE
from kondense.settings import PREFIX, Settings
from kondense.status import now_rfc3339

log = logging.getLogger("kondense.handlers")

# Set once by configure(); handlers read them. kopf's own settings live in kopf's memo.
SETTINGS: Settings = Settings()
KUBE: Kube | None = None


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
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 16
    if KUBE is None:
        configure(Settings.from_env())


def _reconcile(body: kopf.Body | dict) -> InvalidSpec | None:
    """Reconcile one pipeline; returns the InvalidSpec it reported, if any."""
    assert KUBE is not None, "configure() was not called"
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    now = now_rfc3339()
    try:
        outcome = reconcile.reconcile(
            dict(body),
            KUBE.jobs_of(namespace, name),
            KUBE.pods_of(namespace, name),
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


@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL, field="spec")
def pipeline_changed(body: kopf.Body, **_) -> None:
    if error := _reconcile(body):
        raise kopf.PermanentError(f"invalid spec: {error}")


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_PIPELINE: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={LABEL_PIPELINE: kopf.PRESENT})
def child_changed(body: kopf.Body, **_) -> None:
    """A Job or pod of a pipeline changed: recompute the parent's status and start what can start."""
    assert KUBE is not None
    owner = body["metadata"]["labels"][LABEL_PIPELINE]
    parent = KUBE.pipeline(body["metadata"]["namespace"], owner)
    if parent is None or parent["metadata"].get("deletionTimestamp"):
        return
    _reconcile(parent)  # an invalid spec is reported on the pipeline, not on its child
