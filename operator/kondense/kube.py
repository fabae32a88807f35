"""The operator's only door to the Kubernetes API for writes (reads come from kopf's indexes).

Creates treat 409 AlreadyExists as done (children have deterministic names), status is
written as a merge patch of the status subresource, deletes treat 404 as done. Responses are
not deserialized: nothing reads them, the watches deliver the objects.

Like client-go, a write the API server could not serve (429, 5xx, a dropped connection) is
retried a few times, waiting as long as its Retry-After header says. What is left is raised
as `ApiRejected` with a reason from errors.Reason and whether waiting can help.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kondense import api, metrics
from kondense.errors import HINTS, ApiRejected, Reason

log = logging.getLogger("kondense.kube")

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
EVENT_SOURCE = "kondense-operator"


@dataclass
class Kube:
    api_client: client.ApiClient
    attempts: int = 4
    backoff: float = 0.5  # seconds before the first retry, doubling; Retry-After wins
    max_wait: float = 10.0  # no single wait is longer
    instance: str = field(default_factory=socket.gethostname)  # the pod's name in a pod
    # How long the reconcile waits before trying a refused Job again, by reason.
    retry_delays: dict[str, float] = field(
        default_factory=lambda: {Reason.FORBIDDEN: 30.0, Reason.QUOTA_EXCEEDED: 30.0, Reason.API_UNAVAILABLE: 10.0}
    )
    # Built once: the client imports its pydantic models lazily, on first use, which costs about
    # half a second of CPU; paying it at startup keeps it out of the first pipelines' latency.
    batch: client.BatchV1Api = field(init=False)
    core: client.CoreV1Api = field(init=False)
    custom: client.CustomObjectsApi = field(init=False)

    def __post_init__(self) -> None:
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    # -- the one read that no watch delivers -----------------------------------------------
    def log_tail(self, namespace: str, pod: str, container: str, lines: int = 20) -> str | None:
        """The last lines of a container's log (at most 16 KiB), or None when they cannot be read."""
        try:
            response = self.core.read_namespaced_pod_log(
                pod, namespace, container=container, tail_lines=lines, limit_bytes=16384, _preload_content=False
            )
            text = response.read().decode("utf-8", errors="replace")
            response.release_conn()
        except (ApiException, urllib3.exceptions.HTTPError) as e:  # no RBAC, kubelet unreachable, pod gone
            log.debug("No log for %s/%s: %s", namespace, pod, e)
            _count_error(e)
            metrics.PROGRESS_POLLS.labels("error").inc()
            return None
        metrics.PROGRESS_POLLS.labels("ok" if text.strip() else "empty").inc()
        return text

    def pod_create_error(self, namespace: str, job: str) -> str | None:
        """The newest FailedCreate message of a Job: why the Job controller cannot create its pod
        (a missing ServiceAccount or PriorityClass, a Pod Security rejection). The Job's status
        does not say it; only the controller's events do."""
        selector = f"involvedObject.kind=Job,involvedObject.name={job},reason=FailedCreate"
        try:
            found = self.core.list_namespaced_event(namespace, field_selector=selector, limit=20).items
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            log.debug("No events for Job %s/%s: %s", namespace, job, e)
            _count_error(e)
            return None
        found = [  # as the selector says, should the server not filter
            e for e in found
            if e.reason == "FailedCreate" and e.involved_object.name == job and e.involved_object.kind == "Job"
        ]
        if not found:
            return None
        newest = max(found, key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp)
        return newest.message

    # -- the write path --------------------------------------------------------------------

    def event(self, obj: dict, type_: str, reason: str, message: str) -> None:
        """Record a core/v1 Event about `obj`. From any thread: kopf.event needs kopf's task
        context, which reconciles started by timers and pollers do not have. An event that cannot
        be written is logged, never raised: it must not stop the status write after it."""
        meta = obj["metadata"]
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", api.API_VERSION),
                "kind": obj.get("kind", api.KIND),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": EVENT_SOURCE},
            "reportingComponent": EVENT_SOURCE,
            "reportingInstance": self.instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self._call(
                f"record event {reason} on {meta['namespace']}/{meta['name']}",
                lambda: self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False),
            )
        except ApiException as e:
            log.warning("Event %s on %s/%s not recorded: %s", reason, meta["namespace"], meta["name"], _status_message(e))
    def create(self, obj: dict) -> bool:
        """Create a child: a Job, or the headless Service of a multi-node stage. False when it
        already existed (children have deterministic names)."""
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        creators = {"Job": self.batch.create_namespaced_job, "Service": self.core.create_namespaced_service}
        if kind not in creators:
            raise ValueError(f"the operator does not create {kind}")
        try:
            # Strict: a field the server does not know (a typo inside resources.affinity, kept as
            # written by the CRD) is refused with its path, not dropped with a warning.
            self._call(f"create {kind} {ns}/{name}",
                       lambda: creators[kind](ns, obj, field_validation="Strict", _preload_content=False))
        except ApiException as e:
            if e.status == 409:
                return False
            raise self.rejected(e, f"creating {kind} {ns}/{name}") from None
        log.info("Created %s %s/%s", kind, ns, name)
        if kind == "Job":
            metrics.JOBS_CREATED.labels(obj["metadata"].get("labels", {}).get("app.kubernetes.io/component", "stage")).inc()
        return True

    def delete_job(self, namespace: str, name: str, propagation: str = "Background") -> None:
        """Delete a Job and its pods; "Foreground" keeps the Job until its pods are gone."""
        try:
            self._call(
                f"delete Job {namespace}/{name}",
                lambda: self.batch.delete_namespaced_job(
                    name, namespace, propagation_policy=propagation, _preload_content=False
                ),
            )
        except ApiException as e:
            if e.status != 404:
                raise self.rejected(e, f"deleting Job {namespace}/{name}") from None
            return
        metrics.JOBS_DELETED.inc()

    def patch_status(self, namespace: str, name: str, status: dict) -> None:
        """Merge-patch the status subresource. Lists (conditions, stages) are replaced whole."""
        try:
            self._call(
                f"patch status of {namespace}/{name}",
                lambda: self.custom.patch_namespaced_custom_object_status(
                    api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": status}, _preload_content=False
                ),
            )
        except ApiException as e:
            if e.status != 404:  # deleted meanwhile: nothing to report to
                raise self.rejected(e, f"writing the status of {namespace}/{name}") from None

    def rejected(self, e: ApiException, doing: str) -> ApiRejected:
        """An error that retries did not cure -> a reason, a message with a hint, and a delay."""
        message = _status_message(e)
        if e.status in (400, 422):  # the object itself is invalid: only a spec change helps
            return ApiRejected(Reason.INVALID_SPEC, f"the API server refused {doing}: {message}", None)
        if e.status == 403 and "because it is being terminated" in message:  # NamespaceLifecycle: never again
            return ApiRejected(Reason.NAMESPACE_TERMINATING, f"{doing}: {message}", None)
        if e.status == 403:
            reason = Reason.QUOTA_EXCEEDED if "exceeded quota" in message else Reason.FORBIDDEN
        else:
            reason = Reason.API_UNAVAILABLE
        delay = _retry_after(e) or self.retry_delays[reason]
        return ApiRejected(reason, f"{doing}: {message} (hint: {HINTS[reason]})", delay)

    def _call(self, what: str, request: Callable[[], urllib3.HTTPResponse]) -> None:
        """One write, retried while the API server says it is busy or unreachable."""
        for attempt in range(1, self.attempts + 1):
            try:
                response = request()
                response.read()
                response.release_conn()
                return
            except ApiException as e:
                _count_error(e)
                if e.status not in TRANSIENT_STATUS or attempt == self.attempts:
                    raise
                wait = _retry_after(e) or self.backoff * 2 ** (attempt - 1)
                detail = f"{e.status} {e.reason}"
            except urllib3.exceptions.HTTPError as e:  # refused, reset, timed out
                _count_error(e)
                if attempt == self.attempts:
                    raise ApiException(status=0, reason=f"{type(e).__name__}: {e}") from e
                wait, detail = self.backoff * 2 ** (attempt - 1), type(e).__name__
            wait = min(wait, self.max_wait)
            log.warning("%s: %s; retrying in %.1fs (attempt %d of %d)", what, detail, wait, attempt, self.attempts)
            time.sleep(wait)


def _count_error(e: Exception) -> None:
    """kondense_api_errors_total: by HTTP status; 0 for a request the API server never answered."""
    metrics.API_ERRORS.labels(str(e.status if isinstance(e, ApiException) else 0)).inc()


def _retry_after(e: ApiException) -> float | None:
    raw = (e.headers or {}).get("Retry-After")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _status_message(e: ApiException) -> str:
    """The API server's own words (a v1.Status message), else the HTTP reason."""
    try:
        return json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{e.status} {e.reason}".strip()
