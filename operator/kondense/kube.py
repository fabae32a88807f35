"""The operator's only door to the Kubernetes API for writes (reads come from kopf's indexes).

Responses are not deserialized (nothing reads them; the watches deliver the objects).
Creates treat 409 AlreadyExists as done (children have deterministic names), status is
written as a merge patch of the status subresource, deletes treat 404 as done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kondense import api

log = logging.getLogger("kondense.kube")


@dataclass
class Kube:
    api_client: client.ApiClient
    # Built once: the client imports its pydantic models lazily, on first use, which costs about
    # half a second of CPU; paying it at startup keeps it out of the first pipelines' latency.
    batch: client.BatchV1Api = field(init=False)
    custom: client.CustomObjectsApi = field(init=False)

    def __post_init__(self) -> None:
        self.batch = client.BatchV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    # -- the write path --------------------------------------------------------------------
    def create(self, obj: dict) -> bool:
        """Create a Job; False when it already existed (deterministic names)."""
        ns = obj["metadata"]["namespace"]
        if obj["kind"] != "Job":
            raise ValueError(f"the operator does not create {obj['kind']}")
        try:
            _drain(self.batch.create_namespaced_job(ns, obj, _preload_content=False))
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        log.info("Created %s %s/%s", obj["kind"], ns, obj["metadata"]["name"])
        return True

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            _drain(self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background", _preload_content=False))
        except ApiException as e:
            if e.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, status: dict) -> None:
        """Merge-patch the status subresource. Lists (conditions, stages) are replaced whole."""
        try:
            _drain(
                self.custom.patch_namespaced_custom_object_status(
                    api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": status}, _preload_content=False
                )
            )
        except ApiException as e:
            if e.status != 404:  # deleted meanwhile: nothing to report to
                raise


def _drain(response) -> None:
    """Read an undeserialized response to its end and give its connection back to the pool."""
    response.read()
    response.release_conn()
