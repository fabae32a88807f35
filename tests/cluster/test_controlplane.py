"""The test control plane is a real one: CRDs, garbage collection, Jobs, RBAC.

Every wait polls the API with a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from controlplane import ControlPlane, wait_for
from fakekubelet import TERMINATION_LOG_ENV, FakeKubelet, PodOutcome
from kubernetes import client
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.cluster

GROUP = "test.kondense.io"
WIDGETS_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {"size": {"type": "integer", "minimum": 1}},
                            },
                            "status": {
                                "type": "object",
                                "properties": {"phase": {"type": "string"}},
                            },
                        },
                    }
                },
            }
        ],
    },
}
MERGE_PATCH = "application/merge-patch+json"  # custom resources do not do strategic merge


def _has_condition(obj: Any, kind: str, reason: str | None = None) -> bool:
    for condition in obj.status.conditions or []:
        if condition.type == kind and condition.status == "True":
            return reason is None or condition.reason == reason
    return False


def _job(name: str, command: list[str], **container: Any) -> dict[str, Any]:
    """A batch/v1 Job shaped like the operator's: one container, no retries by restart."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "kondense-jobs:test",
                            "command": command,
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            **container,
                        }
                    ],
                }
            },
        },
    }


def _job_pod(core: client.CoreV1Api, namespace: str, job: str) -> client.V1Pod:
    pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job}").items
    assert len(pods) == 1, [p.metadata.name for p in pods]
    return pods[0]


def test_crd_with_status_subresource(api_client: client.ApiClient, namespace: str) -> None:
    extensions = client.ApiextensionsV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    extensions.create_custom_resource_definition(WIDGETS_CRD)
    try:
        wait_for(
            lambda: _has_condition(
                extensions.read_custom_resource_definition_status(f"widgets.{GROUP}"), "Established"
            ),
            timeout=30,
            what="the CRD to be established",
        )
        widget = {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"size": 3},
            "status": {"phase": "ignored"},
        }
        created = custom.create_namespaced_custom_object(GROUP, "v1", namespace, "widgets", widget)
        assert created["spec"] == {"size": 3}
        assert "status" not in created  # with a status subresource, create ignores status

        patched = custom.patch_namespaced_custom_object_status(
            GROUP, "v1", namespace, "widgets", "w", {"status": {"phase": "Ready"}}, _content_type=MERGE_PATCH
        )
        assert patched["status"] == {"phase": "Ready"}
        assert patched["metadata"]["generation"] == 1  # status writes do not bump generation

        # The structural schema is enforced.
        with pytest.raises(ApiException) as invalid:
            custom.patch_namespaced_custom_object(
                GROUP, "v1", namespace, "widgets", "w", {"spec": {"size": 0}}, _content_type=MERGE_PATCH
            )
        assert invalid.value.status == 422
    finally:
        extensions.delete_custom_resource_definition(f"widgets.{GROUP}")


def test_garbage_collector_deletes_dependents(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    owner_reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "dependent", "ownerReferences": [owner_reference]}}
    )
    core.delete_namespaced_config_map("owner", namespace)

    def dependent_gone() -> bool:
        try:
            core.read_namespaced_config_map("dependent", namespace)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    wait_for(dependent_gone, timeout=45, what="the garbage collector to delete the dependent")


def test_job_completes_through_the_fake_kubelet(
    api_client: client.ApiClient, namespace: str, fake_kubelet: FakeKubelet
) -> None:
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "stage"}, "data": {"stage.json": json.dumps({"stage": "distill"})}}
    )
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cr3t"}}
    )
    # Reads the mounted ConfigMap and the Secret-backed env var, writes its summary to the
    # termination-message file, whose local path it gets both as an argument and from the env.
    script = (
        "import json, os, sys\n"
        "spec_path, message_path = sys.argv[1:]\n"
        "assert os.environ['KONDENSE_TERMINATION_LOG'] == message_path, message_path\n"
        "assert os.environ['TOKEN'] == 's3cr3t'\n"
        "spec = json.load(open(spec_path))\n"
        "open(message_path, 'w').write(json.dumps({'stage': spec['stage'], 'ok': True}))\n"
    )
    job = _job(
        "ok",
        ["python", "-c", script, "/etc/kondense/stage.json", "/dev/termination-log"],
        env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}],
        volumeMounts=[{"name": "stage", "mountPath": "/etc/kondense", "readOnly": True}],
    )
    job["spec"]["template"]["spec"]["volumes"] = [{"name": "stage", "configMap": {"name": "stage"}}]
    batch.create_namespaced_job(namespace, job)

    wait_for(
        lambda: _has_condition(batch.read_namespaced_job_status("ok", namespace), "Complete"),
        timeout=30,
        what="Job ok to complete",
    )
    pod = _job_pod(core, namespace, "ok")
    assert pod.spec.node_name == fake_kubelet.node_name
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")
    assert json.loads(terminated.message) == {"stage": "distill", "ok": True}
    run = fake_kubelet.run_for(namespace, pod.metadata.name)
    assert run is not None and run.env[TERMINATION_LOG_ENV].startswith(str(run.dir))


def test_pod_failure_policy_fails_the_job(
    api_client: client.ApiClient, namespace: str, fake_kubelet: FakeKubelet
) -> None:
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    job = _job("exit3", ["python", "-c", "import sys; print('invalid spec: no teacher'); sys.exit(3)"])
    job["spec"]["backoffLimit"] = 6  # without the policy, the Job would retry
    job["spec"]["podFailurePolicy"] = {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [3]}}
        ]
    }
    batch.create_namespaced_job(namespace, job)

    wait_for(
        lambda: _has_condition(
            batch.read_namespaced_job_status("exit3", namespace), "Failed", "PodFailurePolicy"
        ),
        timeout=30,
        what="Job exit3 to fail by its pod failure policy",
    )
    terminated = _job_pod(core, namespace, "exit3").status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    # Empty termination file + FallbackToLogsOnError: the kubelet reports the log's tail.
    assert terminated.message == "invalid spec: no teacher"


def test_behaviour_hook_simulates_an_oom_kill(
    api_client: client.ApiClient, namespace: str, fake_kubelet: FakeKubelet
) -> None:
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    fake_kubelet.behaviour = lambda pod: PodOutcome(137, "OOMKilled")
    batch.create_namespaced_job(namespace, _job("oom", ["python", "-c", "raise SystemExit('never runs')"]))

    wait_for(
        lambda: _has_condition(
            batch.read_namespaced_job_status("oom", namespace), "Failed", "BackoffLimitExceeded"
        ),
        timeout=30,
        what="Job oom to fail",
    )
    pod = _job_pod(core, namespace, "oom")
    terminated = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, terminated.exit_code, terminated.reason) == ("Failed", 137, "OOMKilled")
    assert fake_kubelet.run_for(namespace, pod.metadata.name).output() == ""


def test_a_killed_container_fails_its_pod_with_exit_code_137(
    api_client: client.ApiClient, namespace: str, fake_kubelet: FakeKubelet
) -> None:
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    batch.create_namespaced_job(
        namespace, _job("killed", ["python", "-c", "import time; print('up', flush=True); time.sleep(300)"])
    )
    run = wait_for(
        lambda: next((r for r in fake_kubelet.runs if r.namespace == namespace and r.output()), None),
        timeout=30,
        what="the Job's container to be up",
    )

    run.kill()  # as a lost node or the OOM killer would

    wait_for(
        lambda: _has_condition(
            batch.read_namespaced_job_status("killed", namespace), "Failed", "BackoffLimitExceeded"
        ),
        timeout=30,
        what="Job killed to fail",
    )
    pod = _job_pod(core, namespace, "killed")
    terminated = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, terminated.exit_code, terminated.reason) == ("Failed", 137, "Error")
    assert (run.exit_code, run.restarts) == (137, 0)
    with pytest.raises(RuntimeError, match="no running container"):
        run.kill()


def test_fake_kubelet_builds_the_container_like_a_kubelet(
    api_client: client.ApiClient, namespace: str, fake_kubelet: FakeKubelet
) -> None:
    """Waits for a missing ConfigMap, expands env, keeps emptyDir across an OnFailure restart."""
    core = client.CoreV1Api(api_client)
    fake_kubelet.extra_env["EXTRA"] = "from-the-test"
    script = (
        "import os, pathlib, sys\n"
        "marker = pathlib.Path(sys.argv[1], 'first-attempt')\n"
        "if not marker.exists():\n"
        "    marker.touch()\n"
        "    sys.exit(1)\n"
        "summary = [os.environ[k] for k in ('POD', 'GREETING', 'CFG_COLOR', 'EXTRA')]\n"
        "open(os.environ['KONDENSE_TERMINATION_LOG'], 'w').write('|'.join(summary))\n"
    )
    pod = {
        "metadata": {"name": "envtest"},
        "spec": {
            "restartPolicy": "OnFailure",
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "containers": [
                {
                    "name": "main",
                    "image": "x",
                    "command": ["python", "-c", script],
                    "args": ["/scratch"],
                    "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                    "envFrom": [{"prefix": "CFG_", "configMapRef": {"name": "settings"}}],
                    "env": [
                        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "NAME", "value": "world"},
                        {"name": "GREETING", "value": "hello $(NAME)"},
                    ],
                }
            ],
        },
    }
    core.create_namespaced_pod(namespace, pod)

    def waiting_reason() -> str | None:
        statuses = core.read_namespaced_pod("envtest", namespace).status.container_statuses or []
        return statuses and statuses[0].state.waiting and statuses[0].state.waiting.reason

    wait_for(lambda: waiting_reason() == "CreateContainerConfigError", 15, "CreateContainerConfigError")
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": {"COLOR": "blue"}}
    )

    wait_for(
        lambda: core.read_namespaced_pod("envtest", namespace).status.phase == "Succeeded", 15, "Succeeded"
    )
    status = core.read_namespaced_pod("envtest", namespace).status.container_statuses[0]
    assert status.restart_count == 1
    assert status.last_state.terminated.exit_code == 1
    assert status.state.terminated.message == "envtest|hello world|blue|from-the-test"


def test_indexed_job_pods_get_their_index_and_reach_each_other_by_name(
    api_client: client.ApiClient, namespace: str, fake_kubelet: FakeKubelet
) -> None:
    """The Job controller gives each pod JOB_COMPLETION_INDEX (a fieldRef the fake kubelet
    resolves) and the host name `<job>-<index>`; index 1 reaches index 0 at `<job>-0.<subdomain>`,
    which the fake kubelet's emulated DNS points at 127.0.0.1."""
    core, batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
    import socket

    with socket.socket() as s:  # a free port for index 0 to listen on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import os, socket, sys, time\n"
        "host, port = sys.argv[1].rsplit(':', 1)\n"
        "me, index = os.environ['HOSTNAME'], os.environ['JOB_COMPLETION_INDEX']\n"
        "if index == '0':\n"
        "    with socket.create_server((host, int(port))) as server:\n"
        "        server.settimeout(30)\n"
        "        peer = server.accept()[0].recv(100).decode()\n"
        "    said = f'{me} heard {peer}'\n"
        "else:\n"
        "    deadline = time.monotonic() + 30\n"
        "    while True:\n"
        "        try:\n"
        "            conn = socket.create_connection((host, int(port)), timeout=1)\n"
        "            break\n"
        "        except OSError:\n"
        "            if time.monotonic() > deadline:\n"
        "                raise\n"
        "            time.sleep(0.1)\n"
        "    with conn:\n"
        "        conn.sendall(me.encode())\n"
        "    said = f'{me} said hello'\n"
        "open(os.environ['KONDENSE_TERMINATION_LOG'], 'w').write(said)\n"
    )
    job = _job("peers", ["python", "-c", script, f"peers-0.rdzv:{port}"])
    job["spec"].update(completionMode="Indexed", completions=2, parallelism=2)
    job["spec"]["template"]["spec"]["subdomain"] = "rdzv"
    batch.create_namespaced_job(namespace, job)

    wait_for(
        lambda: _has_condition(batch.read_namespaced_job_status("peers", namespace), "Complete"),
        timeout=60,
        what="Indexed Job peers to complete",
    )
    pods = core.list_namespaced_pod(namespace, label_selector="batch.kubernetes.io/job-name=peers").items
    by_index = {p.metadata.annotations["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    assert sorted(by_index) == ["0", "1"] and all(p.spec.subdomain == "rdzv" for p in pods)
    messages = {i: p.status.container_statuses[0].state.terminated.message for i, p in by_index.items()}
    assert messages == {"0": "peers-0 heard peers-1", "1": "peers-1 said hello"}
    run = fake_kubelet.run_for(namespace, by_index["1"].metadata.name)
    assert run.argv[-1] == f"127.0.0.1:{port}" and run.env["JOB_COMPLETION_INDEX"] == "1"


def test_deleting_a_running_pod_kills_its_process(
    api_client: client.ApiClient, namespace: str, fake_kubelet: FakeKubelet
) -> None:
    core = client.CoreV1Api(api_client)
    pod = {
        "metadata": {"name": "sleeper"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "main", "image": "x", "command": ["python3", "-c", "import time; time.sleep(300)"]}
            ],
        },
    }
    core.create_namespaced_pod(namespace, pod)
    wait_for(
        lambda: core.read_namespaced_pod("sleeper", namespace).status.phase == "Running", 15, "pod Running"
    )
    run = fake_kubelet.run_for(namespace, "sleeper")
    assert run is not None

    core.delete_namespaced_pod("sleeper", namespace)  # graceful: the kubelet has the last word

    def pod_gone() -> bool:
        try:
            core.read_namespaced_pod("sleeper", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(pod_gone, 15, "the pod to be deleted")
    assert run.done.wait(5)
    assert run.exit_code == 128 + 15  # SIGTERM


def test_rbac_is_enforced(control_plane: ControlPlane, api_client: client.ApiClient) -> None:
    # A static-token user without any binding.
    jane = control_plane.api_client(control_plane.kubeconfig_for(control_plane.token_for("jane")))
    with jane, pytest.raises(ApiException) as forbidden:
        client.CoreV1Api(jane).list_namespaced_pod("default")
    assert forbidden.value.status == 403

    # The operator's service account: forbidden until a Role and RoleBinding allow it.
    token = control_plane.service_account_token("kondense-system", "kondense")
    with control_plane.api_client(control_plane.kubeconfig_for(token)) as operator:
        review = client.AuthenticationV1Api(operator).create_self_subject_review({})
        assert review.status.user_info.username == "system:serviceaccount:kondense-system:kondense"
        pods = client.CoreV1Api(operator)
        with pytest.raises(ApiException) as forbidden:
            pods.list_namespaced_pod("kondense-system")
        assert forbidden.value.status == 403

        rbac = client.RbacAuthorizationV1Api(api_client)
        rbac.create_namespaced_role(
            "kondense-system",
            {
                "metadata": {"name": "pod-reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
            },
        )
        rbac.create_namespaced_role_binding(
            "kondense-system",
            {
                "metadata": {"name": "kondense-pod-reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "kondense", "namespace": "kondense-system"}],
            },
        )
        # The RBAC authorizer reads bindings from an informer: poll until it has seen them.
        wait_for(
            lambda: pods.list_namespaced_pod("kondense-system") is not None, 10, "the RoleBinding to apply"
        )
        with pytest.raises(ApiException) as elsewhere:
            pods.list_namespaced_pod("default")
        assert elsewhere.value.status == 403
