"""The operator's only door to the Kubernetes API: reads, and ONE idempotent write path.

Creates treat 409 AlreadyExists as done (children have deterministic names), status is
written as a merge patch of the status subresource, deletes treat 404 as done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kondense import api
from kondense.manifests import LABEL_PIPELINE

log = logging.getLogger("kondense.kube")


@dataclass
class Kube:
    api_client: client.ApiClient

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api_client)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api_client)

    # -- reads -----------------------------------------------------------------------------
    def _plain(self, obj: Any) -> dict:
        return self.api_client.sanitize_for_serialization(obj)

    def jobs_of(self, namespace: str, pipeline: str) -> list[dict]:
        items = self.batch.list_namespaced_job(namespace, label_selector=f"{LABEL_PIPELINE}={pipeline}").items
        return [self._plain(j) for j in items]

    def pods_of(self, namespace: str, pipeline: str) -> list[dict]:
        items = self.core.list_namespaced_pod(namespace, label_selector=f"{LABEL_PIPELINE}={pipeline}").items
        return [self._plain(p) for p in items]

    def pipeline(self, namespace: str, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    # -- the write path --------------------------------------------------------------------
    def create(self, obj: dict) -> bool:
        """Create a ConfigMap or Job; False when it already existed (deterministic names)."""
        ns = obj["metadata"]["namespace"]
        try:
            if obj["kind"] == "Job":
                self.batch.create_namespaced_job(ns, obj)
            elif obj["kind"] == "ConfigMap":
                self.core.create_namespaced_config_map(ns, obj)
            else:
                raise ValueError(f"the operator does not create {obj['kind']}")
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        log.info("Created %s %s/%s", obj["kind"], ns, obj["metadata"]["name"])
        return True

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, status: dict) -> None:
        """Merge-patch the status subresource. Lists (conditions, stages) are replaced whole."""
        try:
            self.custom.patch_namespaced_custom_object_status(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": status}
            )
        except ApiException as e:
            if e.status != 404:  # deleted meanwhile: nothing to report to
                raise
