"""kmock (the kopf author's Kubernetes emulator) helpers for the operator's fine-grained tests.

The end-to-end tests run on a real kube-apiserver (tests/cluster); these run the same kopf
handlers against kmock, where any request can be answered with any error at any moment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import kmock
import yaml
from kubernetes import client

from kondense import api
from kondense.errors import Reason
from kondense.kube import Kube
from kondense.manifests import stage_job
from kondense.plan import resolve
from kondense.settings import Settings
from kondense.validation import parse

NAMESPACE = "ml"
PIPELINES = f"{api.GROUP}/{api.VERSION}/{api.PLURAL}"
JOBS = "batch/v1/jobs"
JOBS_IMAGE = "kondense-jobs:test"
MINIMAL = Path(__file__).resolve().parents[2] / "crds" / "examples" / "minimal.yaml"


@dataclass
class Refusal:
    action: str
    resource: str
    error: kmock.KubernetesError
    times: int | None  # None: until withdrawn
    subresource: str | None = None


class RefusingEmulator(kmock.KubernetesEmulator):
    """kmock's emulator, plus refusals answered before anything is stored.

    kmock 0.8 stores a created object (and announces it on the watch) even when a reaction
    answers the request with an error; a real API server stores nothing it refused.
    """

    def refuse(self, action: str, resource: str, status: int, message: str, times: int | None = None,
               subresource: str | None = None) -> Refusal:
        reason = {403: "Forbidden", 422: "Invalid", 404: "NotFound", 409: "Conflict"}.get(status, "ServiceUnavailable")
        rule = Refusal(action, resource, kmock.KubernetesError(status=status, reason=reason, message=message), times,
                       subresource)
        self.__dict__.setdefault("refusals", []).append(rule)
        return rule

    def withdraw(self, rule: Refusal) -> None:
        self.__dict__["refusals"].remove(rule)

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        for rule in self.__dict__.get("refusals", []):
            if (str(request.action).lower().endswith(rule.action) and request.resource is not None
                    and f"{request.resource.group}/{request.resource.version}/{request.resource.plural}".lstrip("/")
                    == rule.resource and request.subresource == rule.subresource and rule.times != 0):
                if rule.times is not None:
                    rule.times -= 1
                return await self._render_error(rule.error)
        return await super()._handle(request)


def pipeline_doc(name: str, uid: str = "uid-1") -> dict:
    """crds/examples/minimal.yaml as `name` in NAMESPACE, stamped as the API server would (kmock does not)."""
    doc = yaml.safe_load(MINIMAL.read_text())
    doc["metadata"] = {"name": name, "namespace": NAMESPACE, "uid": uid, "generation": 1, "resourceVersion": "1"}
    return doc


def kube_for(server: RefusingEmulator, **options) -> Kube:
    config = client.Configuration(host=str(server.url).rstrip("/"))
    options = {"backoff": 0.01, "retry_delays": dict.fromkeys(
        (Reason.FORBIDDEN, Reason.QUOTA_EXCEEDED, Reason.API_UNAVAILABLE), 0.2), **options}
    return Kube(client.ApiClient(config), **options)


def first_job(doc: dict) -> dict:
    """The Job the operator builds for the pipeline's first stage (what it will create)."""
    p = parse(doc)
    plans = resolve(p.spec, p.metadata.namespace, p.metadata.name)
    return stage_job(p.spec, plans, plans[0], p.metadata.namespace, p.metadata.name, Settings(jobs_image=JOBS_IMAGE))


def requests_for(server: RefusingEmulator, action: str, plural: str, subresource: str | None = None) -> list:
    """The requests kmock received for `action` on `plural` (refused ones included)."""
    return [
        r for r in server
        if str(r.action).lower().endswith(action) and r.resource is not None and r.resource.plural == plural
        and r.subresource == subresource
    ]


def names_of(server: RefusingEmulator, plural: str) -> list[str]:
    """The names of the stored (not deleted) objects of `plural`."""
    return sorted(key[2] for key in server.objects.keys() if key[0].plural == plural and not server.objects[key].deleted)
