"""Run the real operator against the test control plane, as the chart deploys it: in-process
(`running_operator`), or as `python -m kondense.operator` processes (`OperatorProcess`).

The operator authenticates as the chart's ServiceAccount and gets exactly the chart's RBAC
(rendered with helm), so a missing verb fails these tests the way it would fail in a cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
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


def chart_objects(values: list[str] = ()) -> list[dict]:
    """What the chart renders, but its CRD (install_crd installs the generated one)."""
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
    return [d for d in yaml.safe_load_all(out) if d]


def chart_rbac(values: list[str] = ()) -> list[dict]:
    """The chart's ServiceAccounts and RBAC objects, rendered by helm."""
    keep = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    return [d for d in chart_objects(values) if d["kind"] in keep]


def chart_operator_env(values: list[str] = ()) -> dict[str, str]:
    """The operator container's environment as the chart's Deployment sets it, without the
    variables that the downward API fills in (POD_NAME, POD_NAMESPACE)."""
    (deployment,) = [d for d in chart_objects(values) if d["kind"] == "Deployment"]
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e["value"] for e in env if "value" in e}


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


@dataclass
class OperatorProcess:
    """`python -m kondense.operator` in a process of its own, as one replica of the Deployment:
    the chart's environment, POD_NAME/POD_NAMESPACE as the downward API sets them, and a
    kubeconfig with the operator's ServiceAccount token."""

    name: str
    process: subprocess.Popen
    log_path: Path
    port: int
    metrics_port: int

    @classmethod
    def start(
        cls, control_plane, token: str, name: str, env: dict[str, str], folder: Path
    ) -> OperatorProcess:
        from controlplane import free_port

        port, metrics_port = free_port(), free_port()
        environ = {k: v for k, v in os.environ.items() if k != "KUBECONFIG" and not k.startswith("KONDENSE_")}
        environ.update(env)
        environ.update(
            KUBECONFIG=control_plane.kubeconfig_for(token, name=f"operator-{name}"),
            KONDENSE_LIVENESS_HOST="127.0.0.1",  # what the harness probes: the setting end to end
            KONDENSE_LIVENESS_PORT=str(port),
            KONDENSE_METRICS_PORT=str(metrics_port),
            POD_NAME=name,
            POD_NAMESPACE=RELEASE_NAMESPACE,
        )
        log_path = folder / f"{name}.log"
        # --pdeathsig: the kernel kills the operator should the test process die without teardown.
        prefix = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [*prefix, sys.executable, "-m", "kondense.operator"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=environ, cwd=folder,
            )
        return cls(name, process, log_path, port, metrics_port)

    def get(self, path: str) -> tuple[int, str] | None:
        """(status, body) of the metrics server at `path` (/metrics, /readyz); None while nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return None

    def health(self) -> dict | None:
        """The liveness endpoint's answer, or None while nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as response:
                return json.loads(response.read()) if response.status == 200 else None
        except (OSError, ValueError):
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        """For wait_for(check=...): fail at once, with the log, when the process has exited."""
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-4000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()
