"""Fixtures for tests against a real control plane (etcd, kube-apiserver, kube-controller-manager).

* ``control_plane`` (session): a :class:`controlplane.ControlPlane`, with one extra static user,
  ``jane``, who has no RBAC rights at all, and an audit log of every request of the operator's
  service accounts (``control_plane.audit_events()``).
* ``api_client`` (session): an admin ``kubernetes.client.ApiClient`` for it.
* ``namespace`` (function): a fresh namespace, deleted afterwards (without waiting).
* ``fake_kubelet`` (function): a :class:`fakekubelet.FakeKubelet` serving ``namespace``.

The first run builds the binaries (see build-assets.sh); later runs find them in the cache.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# The helpers are plain modules next to this file (tests/ is not a package); make them
# importable whatever pytest's import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from controlplane import ControlPlane, ControlPlaneError, find_assets  # noqa: E402

UNPRIVILEGED_USER = "jane"
# Every request of the service accounts of the operator's namespace (operator_harness.
# RELEASE_NAMESPACE): whether it asks the API server for its children only, and how many
# requests a pipeline costs.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts:kondense-system"]
- level: None
"""


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the binaries (once per machine, ~15 min) before any test runs, with the build's
    progress on the terminal, so that a cold build is not charged to a test's timeout."""
    if not any(item.get_closest_marker("cluster") for item in session.items):
        return
    try:
        find_assets(build=False)
    except ControlPlaneError:
        capture = session.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\ncontrol plane: tests/cluster/build-assets.sh (builds etcd, kube-apiserver, kube-controller-manager on first use)", flush=True)
            try:
                find_assets()
            except ControlPlaneError as exc:  # the control_plane fixture reports it per test
                print(exc, flush=True)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    # OwnerReferencesPermissionEnforcement, as hardened clusters (OpenShift among them) run it:
    # an owner reference that blocks the owner's deletion needs update on <owner>/finalizers.
    flags = ("--enable-admission-plugins=OwnerReferencesPermissionEnforcement",)
    with ControlPlane(users={UNPRIVILEGED_USER: []}, apiserver_flags=flags, audit_policy=AUDIT_POLICY) as cp:
        yield cp


@pytest.fixture(scope="session")
def api_client(control_plane: ControlPlane):  # -> kubernetes.client.ApiClient
    client = control_plane.api_client()
    yield client
    client.close()


@pytest.fixture
def namespace(api_client) -> Iterator[str]:
    from kubernetes import client

    name = f"test-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    # The namespace controller finishes this in the background; nothing waits for it.
    core.delete_namespace(name, _preload_content=False)


@pytest.fixture
def fake_kubelet(api_client, namespace: str):  # -> fakekubelet.FakeKubelet
    from fakekubelet import FakeKubelet

    with FakeKubelet(api_client, [namespace]) as kubelet:
        yield kubelet
