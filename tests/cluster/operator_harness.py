"""Run the real operator in-process against the test control plane, as the chart deploys it.

The operator authenticates as the chart's ServiceAccount and gets exactly the chart's RBAC
(rendered with helm), so a missing verb fails these tests the way it would fail in a cluster.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import kopf
import yaml
from kubernetes import client, utils

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "chart"))
sys.path.insert(0, str(ROOT / "tests"))
import kopf_login  # noqa: E402  (kopf's credentials for the test's identity)
import tools  # noqa: E402  (helm/kubectl from the PyPI wheel, cached outside the repo)

RELEASE_NAMESPACE = "kondense-system"
RELEASE = "kondense"


def install_crd(api_client: client.ApiClient) -> None:
    crd = yaml.safe_load((ROOT / "crds" / "compressionpipelines.yaml").read_text())
    ext = client.ApiextensionsV1Api(api_client)
    try:
        ext.create_custom_resource_definition(crd)
    except client.ApiException as e:
        if e.status != 409:
            raise
    from controlplane import wait_for

    def established():
        got = ext.read_custom_resource_definition(crd["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True" for c in got.status.conditions or [])

    wait_for(established, timeout=30, what="the CRD to be established")


def chart_rbac(values: list[str] = ()) -> list[dict]:
    """The chart's ServiceAccounts and RBAC objects, rendered by helm."""
    out = subprocess.run(
        [
            str(tools.helm()),
            "template",
            RELEASE,
            str(ROOT / "charts" / "kondense"),
            "-n",
            RELEASE_NAMESPACE,
            "--set",
            "crds.enabled=false",
            *[a for v in values for a in ("--set", v)],
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    keep = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    return [d for d in yaml.safe_load_all(out) if d and d["kind"] in keep]


def apply(api_client: client.ApiClient, objects: list[dict]) -> None:
    for obj in objects:
        try:
            utils.create_from_dict(api_client, obj)
        except utils.FailToCreateError as e:
            if not all(getattr(x, "status", None) == 409 for x in e.api_exceptions):
                raise


def wait_for_rbac(api_client: client.ApiClient, user: str, namespace: str, rules: list[tuple[str, str, str]]) -> None:
    """Wait until the authorizer grants `user` every (group, resource[/subresource], verb): RBAC
    objects take effect through an informer, a moment after they are created."""
    from controlplane import wait_for

    authz = client.AuthorizationV1Api(api_client)

    def allowed() -> bool:
        for group, resource, verb in rules:
            resource, _, sub = resource.partition("/")
            review = authz.create_subject_access_review({"spec": {"user": user, "resourceAttributes": {
                "group": group, "resource": resource, "subresource": sub, "verb": verb, "namespace": namespace}}})
            if not review.status.allowed:
                return False
        return True

    wait_for(allowed, timeout=30, what=f"RBAC to grant {user} {rules}")


def operator_service_account(objects: list[dict]) -> str:
    binding = next(
        o
        for o in objects
        if o["kind"] == "ClusterRoleBinding" and o["metadata"]["name"].endswith("-application")
    )
    return binding["subjects"][0]["name"]


@contextmanager
def running_operator(control_plane, token: str, settings) -> Iterator[client.ApiClient]:
    """The operator's handlers in a kopf loop on a thread, authenticated by `token`."""
    from kondense import handlers

    kubeconfig = control_plane.kubeconfig_for(token, name="kondense-operator")
    api_client = control_plane.api_client(kubeconfig)
    api_client.configuration.connection_pool_maxsize = 32
    handlers.configure(settings, api_client)
    kopf_login.use(control_plane.server, token=token, ca=control_plane.ca_file)
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(kopf.operator(clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready))
        except BaseException as e:  # noqa: BLE001 - surfaced to the test below
            errors.append(e)
            ready.set()

    thread = threading.Thread(target=main, name="kopf", daemon=True)
    thread.start()
    if not ready.wait(60) or errors:
        raise RuntimeError(f"the operator did not start: {errors}")
    try:
        yield api_client
    finally:
        stop.set()
        thread.join(30)
        api_client.close()
        if errors:
            raise errors[0]
