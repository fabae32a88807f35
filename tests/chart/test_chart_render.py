"""The chart renders valid, least-privilege, secure objects for every supported shape of values."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kondense import chart, generate
from kondense.settings import Settings

K8S = "1.33"
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kondense"
NAMESPACE = "kondense-system"  # the release namespace conftest renders with
POD = "kondense-5d9c7b-x2x7q"  # an operator pod's name, as the downward API gives it

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "watch-namespaces": {"watchNamespaces": ["ml-a", "ml-b"]},
    "job-namespaces": {"jobNamespaces": ["team-1", "team-2", "team-3"]},
    "two-replicas": {"operator": {"replicas": 2}},
    "two-replicas-namespaced": {
        "operator": {"replicas": 2, "leaderElection": {"leaseDurationSeconds": 30, "retryPeriodSeconds": 5}},
        "watchNamespaces": ["ml-a"],
    },
    "no-leader-election": {"operator": {"leaderElection": {"enabled": False}}},
    "crds-disabled": {"crds": {"enabled": False}, "rbac": {"aggregateToUserRoles": False}},
    "everything-set": {
        "fullnameOverride": "kdz",
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {
            "image": {"tag": "0.1.0-rc1", "pullPolicy": "Always"},
            "extraEnv": [{"name": "EXTRA", "value": "1"}],
            "podAnnotations": {"a": "b"},
            "podLabels": {"team": "ml"},
            "priorityClassName": "system-cluster-critical",
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {}},
            "livenessHost": "::",
            "livenessPort": 9090,
        },
        "serviceAccount": {"name": "op", "annotations": {"team": "ml"}},
        "metrics": {"port": 9191, "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}},
                    "dashboard": {"enabled": True}},
        "jobs": {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}},
                 "allowedImages": ["registry.example/ml/", "ghcr.io/acme/jobs:1.2"]},
    },
}
CASES = [pytest.param(v, id=k) for k, v in VALUE_SETS.items()]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    )
    return found[0]


def env_of(deployment: dict) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def first_line(error: Exception) -> str:
    return str(error).splitlines()[0]


def merged_values(values: dict) -> chart.ChartValues:
    """The values helm sees: the user's merged over the chart's defaults."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in over.items()}}
        return over

    return chart.ChartValues.model_validate(merge(chart.defaults(), values))


def openapi_validate(doc: dict, schema: dict) -> None:
    """A CRD's OpenAPI v3.0 schema (draft-4 style: boolean exclusiveMaximum); x-kubernetes-* ignored."""
    jsonschema.Draft4Validator(schema).validate(doc)


def crd_schema(crd: dict) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# -- validity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("values", CASES)
def test_helm_lint_strict_passes(run_helm, values):
    done = run_helm(["lint", "--strict", str(CHART), "--namespace", NAMESPACE], values)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("values", CASES)
def test_every_object_is_valid_for_kubernetes_1_33(render, values):
    problems = []
    for obj in render(values):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # the Prometheus Operator's own CRD: test_metrics_objects_fit_together checks it
        try:
            kubernetes_validate.validate(obj, K8S, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{where}: {first_line(e)}")
    assert not problems, "\n".join(problems)


def test_crd_validates_the_examples_users_read(render):
    crd = one(render(), "CustomResourceDefinition", "compressionpipelines.kondense.io")
    schema = crd_schema(crd)
    examples = sorted((ROOT / "crds" / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            openapi_validate(doc, schema)
    bad = yaml.safe_load(examples[0].read_text())
    bad["spec"]["resources"] = {"gpus": -1}
    with pytest.raises(jsonschema.ValidationError, match="-1"):
        openapi_validate(bad, schema)


def test_generated_chart_files_are_up_to_date():
    chart_files = [p for p in generate.stale(ROOT) if str(p).startswith("charts/")]
    assert not chart_files, f"{chart_files} out of date: run `kondense crd`"
    assert (CHART / "values.schema.json").read_text() == chart.values_schema()


# -- security ----------------------------------------------------------------------------------


def pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((o["metadata"]["name"], o["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            out.append((o["metadata"]["name"], o["spec"]))
    return out


@pytest.mark.parametrize("values", CASES)
def test_every_container_is_locked_down(render, values):
    pods = pod_specs(render(values))
    assert pods
    for name, pod in pods:
        pod_sc = pod.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c.get("securityContext", {})
            non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert non_root is True and uid not in (None, 0), f"{name}/{c['name']} may run as root"
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{c['name']}"
            assert not sc.get("capabilities", {}).get("add"), f"{name}/{c['name']}"
            assert sc.get("privileged") is not True
            assert c["resources"].get("requests") and c["resources"].get("limits"), (
                f"{name}/{c['name']} needs resources"
            )
            assert re.search(r":[\w][\w.-]*$", c["image"]) and not c["image"].endswith(":latest"), c["image"]


def rules_of(objs: list[dict]) -> list[tuple[str, dict]]:
    return [
        (f"{o['kind']}/{o['metadata']['name']}", r)
        for o in objs
        if o["kind"] in ("Role", "ClusterRole")
        for r in o["rules"]
    ]


@pytest.mark.parametrize("values", CASES)
def test_no_rule_grants_secrets_or_wildcards(render, values):
    rules = rules_of(render(values))
    assert rules
    for where, rule in rules:
        assert "secrets" not in rule.get("resources", []), f"{where} grants secrets"
        for key in ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs"):
            assert "*" not in rule.get(key, []), f"{where} has a wildcard in {key}"
        assert (
            "escalate" not in rule["verbs"]
            and "bind" not in rule["verbs"]
            and "impersonate" not in rule["verbs"]
        )


def granted(
    objs: list[dict], kinds: tuple[str, ...], namespace: str | None = None
) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples granted by the Roles/ClusterRoles of the given kinds."""
    out = set()
    for o in objs:
        if o["kind"] in kinds and (namespace is None or o["metadata"].get("namespace") == namespace):
            if o["metadata"]["name"].endswith(("-edit", "-view")):
                continue
            for r in o["rules"]:
                out |= {(g, res, v) for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}
    return out


# Every verb with its user; tests/cluster runs the operator with these rules and nothing more.
APPLICATION = (
    # kopf: the watch (list, watch); its finalizer and kondense.io/* annotations (patch).
    {("kondense.io", "compressionpipelines", v) for v in ("list", "watch", "patch")}
    | {("kondense.io", "compressionpipelines/status", "patch")}  # Kube.patch_status
    | {("kondense.io", "compressionpipelines/finalizers", "update")}  # Jobs' blockOwnerDeletion
    # Kube.create, the Job index (list, watch), Kube.delete_job.
    | {("batch", "jobs", v) for v in ("create", "list", "watch", "delete")}
    | {("", "pods", v) for v in ("list", "watch")}  # the pod index
    | {("", "pods/log", "get")}  # Kube.log_tail: progress
    | {("", "services", "create")}  # Kube.create: multi-node stages' rendezvous names
)
DISCOVERY = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")} | {
    ("", "namespaces", v) for v in ("list", "watch")
}
EVENTS = {("", "events", "create"), ("", "events", "list")}  # list: a Job's FailedCreate events
LEASES = {("coordination.k8s.io", "leases", v) for v in ("create", "get", "update")}


def test_cluster_wide_rbac_is_exactly_framework_plus_application(render):
    objs = render()
    assert granted(objs, ("ClusterRole",)) == DISCOVERY | EVENTS | APPLICATION
    assert [o["metadata"]["name"] for o in by_kind(objs, "Role") + by_kind(objs, "RoleBinding")] == [
        "kondense-leader-election"
    ] * 2
    names = {o["metadata"]["name"] for o in by_kind(objs, "ClusterRoleBinding")}
    assert names == {"kondense-framework", "kondense-application"}
    for binding in by_kind(objs, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kondense", "namespace": NAMESPACE}]


def test_namespaced_rbac_gives_a_role_per_namespace_and_only_discovery_cluster_wide(render):
    objs = render(VALUE_SETS["watch-namespaces"])
    assert granted(objs, ("ClusterRole",)) == DISCOVERY
    for ns in ("ml-a", "ml-b"):
        assert granted(objs, ("Role",), ns) == EVENTS | APPLICATION
        roles = {o["metadata"]["name"] for o in by_kind(objs, "Role") if o["metadata"]["namespace"] == ns}
        bindings = {
            o["metadata"]["name"] for o in by_kind(objs, "RoleBinding") if o["metadata"]["namespace"] == ns
        }
        assert roles == bindings == {"kondense-framework", "kondense-application"}
    assert {o["metadata"]["name"] for o in by_kind(objs, "ClusterRoleBinding")} == {"kondense-framework"}


@pytest.mark.parametrize("values", [None, VALUE_SETS["watch-namespaces"]], ids=["cluster-wide", "namespaced"])
def test_operator_may_create_services_and_nothing_more_with_them(render, values):
    """A multi-node stage's headless Service: created, never read, changed or deleted by the
    operator (its owner reference to the pipeline lets the garbage collector remove it)."""
    service_verbs = {v for _, res, v in granted(render(values), ("ClusterRole", "Role")) if res == "services"}
    assert service_verbs == {"create"}


@pytest.mark.parametrize("name", ["defaults", "two-replicas", "two-replicas-namespaced", "everything-set"])
def test_leader_election_may_use_its_own_lease_in_the_release_namespace_and_nothing_else(render, name):
    """get/update of the one Lease the operator is told to use; create (which cannot be limited to a
    name); in a Role of the release namespace, never in a ClusterRole or a watched namespace."""
    objs = render(VALUE_SETS[name])
    lease = env_of(one(objs, "Deployment"))["KONDENSE_LEASE_NAME"]
    role = one(objs, "Role", f"{lease}-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert sorted((sorted(r["verbs"]), r.get("resourceNames", [])) for r in role["rules"]) == [
        (["create"], []),
        (["get", "update"], [lease]),
    ]
    assert granted(objs, ("Role",), NAMESPACE) == LEASES
    assert not {res for _, res, _ in granted(objs, ("ClusterRole",))} & {"leases"}
    binding = one(objs, "RoleBinding", role["metadata"]["name"])
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == one(objs, "Deployment")["spec"]["template"]["spec"].get(
        "serviceAccountName"
    )


def test_no_lease_rules_without_leader_election(render):
    objs = render(VALUE_SETS["no-leader-election"])
    assert not by_kind(objs, "Role")
    assert not {res for _, res, _ in granted(objs, ("ClusterRole", "Role"))} & {"leases"}


def test_user_roles_aggregate_into_builtin_roles(render):
    objs = render()
    edit, view = one(objs, "ClusterRole", "kondense-edit"), one(objs, "ClusterRole", "kondense-view")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert set(edit["rules"][0]["verbs"]) == {"create", "update", "patch", "delete", "get", "list", "watch"}
    assert all(set(r["verbs"]) == {"get", "list", "watch"} for r in view["rules"])
    assert not [
        o for o in render(VALUE_SETS["crds-disabled"]) if o["metadata"]["name"].endswith(("-edit", "-view"))
    ]


# -- the operator Deployment and its settings ---------------------------------------------------


def test_defaults_run_one_operator_that_hands_over_through_the_lease(render):
    objs = render()
    deploy = one(objs, "Deployment")
    # The new pod of an update waits as a standby until the old one releases the Lease.
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = deploy["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "kondense.operator"]
    assert container["image"] == "ghcr.io/kondense/kondense-operator:0.1.0"
    assert pod["automountServiceAccountToken"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[probe["port"]] == 8080
    assert env_of(deploy)["KONDENSE_LEADER_ELECTION"] == "true"
    downward = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
                for e in container["env"] if "valueFrom" in e}
    assert downward == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}


def test_without_leader_election_one_operator_is_replaced_with_recreate(render):
    deploy = one(render(VALUE_SETS["no-leader-election"]), "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert env_of(deploy)["KONDENSE_LEADER_ELECTION"] == "false"


@pytest.mark.parametrize("values", CASES)
def test_operator_env_is_what_settings_reads(render, values):
    """The Deployment's env, read by the operator's own Settings.from_env, gives the chart's values."""
    merged = merged_values(values)
    deploy = one(render(values), "Deployment")
    env = env_of(deploy)
    # What the downward API gives the pod.
    env.update(POD_NAME=POD, POD_NAMESPACE=NAMESPACE)
    settings = Settings.from_env({k: v for k, v in env.items() if v is not None})
    tag = merged.jobs.image.tag or "0.1.0"
    assert settings.jobs_image == f"{merged.jobs.image.repository}:{tag}"
    assert settings.image_pull_policy == merged.jobs.image.pull_policy
    assert settings.namespaces == tuple(merged.watch_namespaces)
    assert settings.job_service_account == merged.jobs.service_account.name
    assert settings.ttl_seconds_after_finished == merged.jobs.ttl_seconds_after_finished
    assert settings.scratch_size_limit == merged.jobs.scratch_size_limit
    assert settings.allowed_images == tuple(merged.jobs.allowed_images)
    assert settings.liveness_port == merged.operator.liveness_port
    assert settings.liveness_host == merged.operator.liveness_host
    assert settings.metrics_port == merged.metrics.port
    election = merged.operator.leader_election
    if not election.enabled:
        assert settings.election is None
    else:
        assert settings.election is not None
        assert (settings.election.namespace, settings.election.identity) == (NAMESPACE, POD)
        assert settings.election.lease == deploy["metadata"]["name"]
        assert (
            settings.election.lease_duration,
            settings.election.renew_deadline,
            settings.election.retry_period,
        ) == (election.lease_duration_seconds, election.renew_deadline_seconds, election.retry_period_seconds)
    assert env["KONDENSE_LOG_LEVEL"] == merged.operator.log_level
    probe_port = deploy["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert probe_port == merged.operator.liveness_port


def test_every_kondense_variable_the_chart_sets_is_read_by_the_operator(render):
    source = "".join(p.read_text() for p in (ROOT / "operator" / "kondense").glob("*.py"))
    names = [n for n in env_of(one(render(), "Deployment")) if n.startswith("KONDENSE_")]
    assert names and all(f'"{n}"' in source for n in names), [n for n in names if f'"{n}"' not in source]


@pytest.mark.parametrize("name", ["two-replicas", "two-replicas-namespaced"])
def test_replicas_roll_with_leader_election(render, name):
    deploy = one(render(VALUE_SETS[name]), "Deployment")
    assert deploy["spec"]["replicas"] == 2 and deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    assert env_of(deploy)["KONDENSE_LEADER_ELECTION"] == "true"


@pytest.mark.parametrize("values", CASES)
def test_metrics_objects_fit_together(render, values):
    """The Service selects the operator pods and targets the container's metrics port, which
    also serves the readiness probe; the ServiceMonitor selects the Service; the dashboard asks
    only for metrics the operator exports."""
    from prometheus_client import REGISTRY

    from kondense import metrics  # noqa: F401 - registers the operator's metrics

    merged = merged_values(values)
    objs = render(values)
    deploy = one(objs, "Deployment")
    pod = deploy["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == merged.metrics.port != ports["healthz"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    services = by_kind(objs, "Service")
    if not merged.metrics.service:
        assert not services
        return
    service = one(objs, "Service", f"{deploy['metadata']['name']}-metrics")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": merged.metrics.port, "targetPort": "metrics",
                                         "protocol": "TCP"}]
    monitors = by_kind(objs, "ServiceMonitor")
    assert len(monitors) == int(merged.metrics.service_monitor.enabled)
    for monitor in monitors:
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"] == [
            {"port": "metrics", "path": "/metrics", "interval": merged.metrics.service_monitor.interval}
        ]
        assert merged.metrics.service_monitor.labels.items() <= monitor["metadata"]["labels"].items()
    dashboards = [c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert len(dashboards) == int(merged.metrics.dashboard.enabled)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    exported = {family.name + suffix for family in REGISTRY.collect() for suffix in suffixes.get(family.type, ())}
    for config_map in dashboards:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        dashboard = json.loads(config_map["data"]["kondense.json"])
        exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
        asked = {name for expr in exprs for name in re.findall(r"\b(kondense_[a-z_]+)", expr)}
        assert asked and asked <= exported, asked - exported


def test_equal_metrics_and_liveness_ports_are_refused(run_helm):
    done = run_helm(["template", "kondense", str(CHART)], {"metrics": {"port": 8080}})
    assert done.returncode != 0 and "metrics.port and operator.livenessPort must differ" in done.stderr


def test_more_replicas_without_leader_election_is_refused(run_helm):
    values = {"operator": {"replicas": 2, "leaderElection": {"enabled": False}}}
    done = run_helm(["template", "kondense", str(CHART)], values)
    assert done.returncode != 0 and "needs operator.leaderElection.enabled" in done.stderr


@pytest.mark.parametrize(
    "timings",
    [
        pytest.param({"leaseDurationSeconds": 10, "renewDeadlineSeconds": 10}, id="deadline-not-below-lease"),
        pytest.param({"renewDeadlineSeconds": 2, "retryPeriodSeconds": 2}, id="retry-not-below-deadline"),
    ],
)
def test_leader_election_timings_that_could_let_two_leaders_act_are_refused(run_helm, timings):
    done = run_helm(["template", "kondense", str(CHART)], {"operator": {"leaderElection": timings}})
    assert done.returncode != 0
    assert "leaseDurationSeconds > renewDeadlineSeconds > retryPeriodSeconds" in done.stderr, done.stderr


# -- service accounts and CRDs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "values, namespaces",
    [
        pytest.param({}, [NAMESPACE], id="release-namespace"),
        pytest.param(VALUE_SETS["watch-namespaces"], ["ml-a", "ml-b"], id="watch-namespaces"),
        pytest.param(VALUE_SETS["job-namespaces"], ["team-1", "team-2", "team-3"], id="job-namespaces"),
        pytest.param({"watchNamespaces": ["a"], "jobNamespaces": ["b"]}, ["b"], id="job-namespaces-win"),
    ],
)
def test_job_service_account_in_every_job_namespace_without_token(render, values, namespaces):
    objs = render(values)
    jobs_sa = [o for o in by_kind(objs, "ServiceAccount") if o["metadata"]["name"] == "kondense-job"]
    assert sorted(o["metadata"]["namespace"] for o in jobs_sa) == sorted(namespaces)
    assert all(o["automountServiceAccountToken"] is False for o in jobs_sa)
    operator_sa = one(objs, "ServiceAccount", "kondense")
    assert (
        operator_sa["metadata"]["namespace"] == NAMESPACE
        and operator_sa["automountServiceAccountToken"] is True
    )


def test_pull_secrets_reach_the_job_service_account(render):
    objs = render(VALUE_SETS["everything-set"])
    job_sa = one(objs, "ServiceAccount", "kondense-job")
    assert job_sa["imagePullSecrets"] == [{"name": "regcred"}]
    assert job_sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "op"


@pytest.mark.parametrize("keep", [True, False])
def test_crd_is_a_template_kept_on_uninstall(render, keep):
    crd = one(
        render({"crds": {"keep": keep}}), "CustomResourceDefinition", "compressionpipelines.kondense.io"
    )
    annotations = crd["metadata"].get("annotations") or {}
    assert (annotations.get("helm.sh/resource-policy") == "keep") is keep
    names = {
        o["metadata"]["name"]
        for o in render(VALUE_SETS["crds-disabled"])
        if o["kind"] == "CustomResourceDefinition"
    }
    assert "compressionpipelines.kondense.io" not in names


# -- the schema guards the values ---------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        "operator.logLevel=LOUD",
        "operator.replicas=0",
        "operator.livenessPort=80",
        "operator.livenessHost=localhost",
        "metrics.port=80",
        "metrics.serviceMonitor.interval=often",
        "operator.leaderElection.retryPeriodSeconds=0",
        "crds.keep=maybe",
        "jobs.image.tag=latest",
        "jobs.scratchSizeLimit=lots",
        "watchNamespaces[0]=Not_A_Namespace",
        "unknownKey=1",
        "operator.unknownKey=1",
    ],
)
def test_schema_rejects_bad_values(run_helm, setting):
    done = run_helm(["lint", str(CHART), "--set", setting])
    assert done.returncode != 0, f"--set {setting} was accepted"
    assert "schema" in (done.stdout + done.stderr).lower(), done.stdout + done.stderr


def test_notes_render(run_helm):
    done = run_helm(["install", "kondense", str(CHART), "--dry-run=client", "--namespace", NAMESPACE])
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert (
        "kubectl get cpl" in notes
        and "resource.customizations.health.kondense.io_CompressionPipeline" in notes
    )
