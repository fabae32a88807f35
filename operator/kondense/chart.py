"""The Helm chart's values: one pydantic model, the source of charts/kondense/values.schema.json.

values.yaml is written by hand, with a comment on every key; tests check that it has exactly
the keys of this model, that its values equal the model's defaults and that it passes the
generated schema. `kondense crd` writes the schema (see generate.py).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kondense.crd import inline_refs

# A Kubernetes namespace name (RFC 1123 label).
NAMESPACE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A resource name (RFC 1123 subdomain), e.g. a ServiceAccount.
NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"

Quantity = int | float | str


class Values(BaseModel):
    """Base of every values section: camelCase keys, unknown keys rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class PullSecret(Values):
    """A reference to an image pull Secret."""

    name: str = Field(description="Name of a kubernetes.io/dockerconfigjson Secret.", pattern=NAME)


class Image(Values):
    """A container image."""

    repository: str = Field(description="Image repository, without tag.", min_length=1)
    tag: str = Field(
        "",
        description="Image tag; empty means the chart's appVersion. `latest` is refused: pin a version.",
        json_schema_extra={"not": {"const": "latest"}},
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Kubernetes imagePullPolicy."
    )


class JobServiceAccount(Values):
    """The ServiceAccount the stage Jobs' pods run as (no API token is mounted)."""

    create: bool = Field(
        True, description="Create the ServiceAccount in every job namespace (see jobNamespaces)."
    )
    name: str = Field(
        "kondense-job", description="Its name; the operator puts it on every Job it creates.", pattern=NAME
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Annotations, e.g. a cloud IAM role binding for object storage access "
        "(eks.amazonaws.com/role-arn, iam.gke.io/gcp-service-account).",
    )


class Jobs(Values):
    """How the operator builds the stage Jobs."""

    image: Image = Field(
        default_factory=lambda: Image(repository="ghcr.io/kondense/kondense-jobs"),
        description="The image every stage runs: torch, transformers, trl, llm-compressor, llama.cpp.",
    )
    service_account: JobServiceAccount = Field(
        default_factory=JobServiceAccount, description="The Job pods' ServiceAccount."
    )
    ttl_seconds_after_finished: int = Field(
        86400,
        ge=0,
        description="Seconds a finished Job (and its pod's log) is kept before Kubernetes deletes it.",
    )
    scratch_size_limit: str = Field(
        "200Gi",
        pattern=QUANTITY,
        description="Local disk of a stage pod where a pipeline sets no resources.scratchSize: the size limit of "
        "the emptyDir where it downloads its inputs and writes its outputs, and its ephemeral-storage request.",
    )
    allowed_images: list[str] = Field(
        default_factory=list,
        description="Prefixes of the images a pipeline's spec.image may name, e.g. registry.example/ml/; a "
        "pipeline naming another fails with InvalidSpec. Empty: any image. jobs.image is always allowed.",
        json_schema_extra={"items": {"type": "string", "minLength": 1, "pattern": r"^[^,\s]+$"},
                           "uniqueItems": True},
    )
    progress_seconds: int = Field(
        30,
        ge=0,
        description="How often the operator reads the tail of each running stage's log for its progress "
        "(status.stages[].progress); 0 turns it off.",
    )


class Resources(Values):
    """Compute resources of a container."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict, description="Minimum resources (cpu, memory)."
    )
    limits: dict[str, Quantity] = Field(default_factory=dict, description="Maximum resources (cpu, memory).")


class LeaderElection(Values):
    """Leader election through a coordination.k8s.io/v1 Lease in the release namespace."""

    enabled: bool = Field(
        True,
        description="Replicas elect one leader through a Lease named after the release; only the leader "
        "runs the operator, the others wait and take over when its Lease expires or is released. Lets "
        "replicas exceed 1 and updates roll without two operators acting at once. Off: exactly one "
        "replica, replaced with the Recreate strategy.",
    )
    lease_duration_seconds: int = Field(
        15, ge=2, description="A standby takes the Lease after seeing it unrenewed this long."
    )
    renew_deadline_seconds: int = Field(
        10,
        ge=1,
        description="The leader exits (and its pod restarts as a standby) when it could not renew the Lease "
        "for this long; less than leaseDurationSeconds.",
    )
    retry_period_seconds: int = Field(
        2,
        ge=1,
        description="How often the leader renews and a standby looks; less than renewDeadlineSeconds.",
    )


class Operator(Values):
    """The operator Deployment."""

    image: Image = Field(
        default_factory=lambda: Image(repository="ghcr.io/kondense/kondense-operator"),
        description="The operator image (light: pydantic, kopf, kubernetes, boto3).",
    )
    replicas: int = Field(
        1,
        ge=1,
        description="Replicas; more than one needs leaderElection.enabled (one leads, the others wait).",
    )
    leader_election: LeaderElection = Field(
        default_factory=LeaderElection, description="Leader election for high availability."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of the operator."
    )
    liveness_host: str = Field(
        "0.0.0.0",
        pattern=r"^([0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9a-fA-F:]*:[0-9a-fA-F:.]*)$",
        description="Address the liveness, readiness and metrics endpoints bind to: 0.0.0.0 (every IPv4 "
        "address), :: (IPv6 and dual-stack clusters). The kubelet probes the pod's IP, so a loopback address "
        "fails the probes.",
    )
    liveness_port: int = Field(
        8080,
        ge=1024,
        le=65535,
        description="Port of the liveness endpoint (/healthz) that the liveness probe calls: kopf's on the "
        "leader, the operator's own on a standby.",
    )
    resources: Resources = Field(
        default_factory=lambda: Resources(
            requests={"cpu": "100m", "memory": "256Mi"}, limits={"cpu": "1", "memory": "512Mi"}
        ),
        description="The operator container's resources.",
    )
    extra_env: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra environment variables (EnvVar objects) for the operator container.",
        json_schema_extra={
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string", "description": "Variable name."}},
            }
        },
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations on the operator pod."
    )
    pod_labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on the operator pod.")
    priority_class_name: str = Field("", description="PriorityClass of the operator pod; empty for none.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node selector of the operator pod."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Tolerations of the operator pod."
    )
    affinity: dict[str, Any] = Field(default_factory=dict, description="Affinity of the operator pod.")


class ServiceAccount(Values):
    """The operator's ServiceAccount."""

    create: bool = Field(True, description="Create the operator's ServiceAccount.")
    name: str = Field(
        "",
        description="Its name; empty means the release's full name.",
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$",
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations on the operator's ServiceAccount."
    )


class Rbac(Values):
    """Roles and bindings."""

    create: bool = Field(
        True, description="Create the operator's roles and bindings (framework and application rules)."
    )
    aggregate_to_user_roles: bool = Field(
        True,
        description="Create the <fullname>-edit and <fullname>-view ClusterRoles that aggregate "
        "CompressionPipeline access into the built-in admin, edit and view roles.",
    )


class Crds(Values):
    """The CompressionPipeline CustomResourceDefinition."""

    enabled: bool = Field(
        True, description="Install and upgrade the CRD with the chart (templates/crd.yaml)."
    )
    keep: bool = Field(
        True,
        description="Keep the CRD on `helm uninstall` (helm.sh/resource-policy: keep): deleting it "
        "would delete every pipeline.",
    )


class ServiceMonitor(Values):
    """A Prometheus Operator ServiceMonitor for the metrics Service."""

    enabled: bool = Field(
        False, description="Create a monitoring.coreos.com/v1 ServiceMonitor (needs the Prometheus Operator's CRDs)."
    )
    interval: str = Field("30s", pattern=r"^[0-9]+(ms|s|m|h)$", description="Scrape interval, e.g. 30s.")
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels, those your Prometheus selects ServiceMonitors by (e.g. release: prometheus).",
    )


class Dashboard(Values):
    """A Grafana dashboard of the operator's metrics, as a ConfigMap."""

    enabled: bool = Field(False, description="Create the dashboard ConfigMap (charts/kondense/dashboards/kondense.json).")
    labels: dict[str, str] = Field(
        default_factory=lambda: {"grafana_dashboard": "1"},
        description="Labels of the ConfigMap: the default is what Grafana's dashboard sidecar looks for.",
    )


class Metrics(Values):
    """Prometheus metrics (/metrics) and readiness (/readyz) of every operator replica."""

    port: int = Field(
        8081,
        ge=1024,
        le=65535,
        description="Port of /metrics and /readyz (the readiness probe), bound to operator.livenessHost.",
    )
    service: bool = Field(True, description="A ClusterIP Service <fullname>-metrics on the operator pods, port `metrics`.")
    service_monitor: ServiceMonitor = Field(default_factory=ServiceMonitor, description="Prometheus Operator scraping.")
    dashboard: Dashboard = Field(default_factory=Dashboard, description="Grafana dashboard.")


class ChartValues(Values):
    """Values of the kondense chart."""

    name_override: str = Field("", description="Replaces the chart name in resource names and labels.")
    fullname_override: str = Field("", description="Replaces the release's full name in resource names.")
    image_pull_secrets: list[PullSecret] = Field(
        default_factory=list,
        description="Pull secrets ([{name: ...}]) for the operator pod; also set on the Job ServiceAccount "
        "(the secrets must exist in every job namespace).",
    )
    watch_namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces the operator serves, with a Role per namespace; empty: the whole "
        "cluster, with ClusterRoles.",
        json_schema_extra={"items": {"type": "string", "pattern": NAMESPACE}, "uniqueItems": True},
    )
    job_namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces that get the Job ServiceAccount, i.e. where pipelines may run; "
        "empty: watchNamespaces, or the release namespace when that is empty too.",
        json_schema_extra={"items": {"type": "string", "pattern": NAMESPACE}, "uniqueItems": True},
    )
    operator: Operator = Field(default_factory=Operator, description="The operator Deployment.")
    service_account: ServiceAccount = Field(
        default_factory=ServiceAccount, description="The operator's ServiceAccount."
    )
    jobs: Jobs = Field(default_factory=Jobs, description="The stage Jobs the operator creates.")
    rbac: Rbac = Field(default_factory=Rbac, description="Roles and bindings.")
    metrics: Metrics = Field(default_factory=Metrics, description="Prometheus metrics and readiness.")
    crds: Crds = Field(default_factory=Crds, description="The CompressionPipeline CRD.")


def _without(node: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_without(x, keys) for x in node]
    if not isinstance(node, dict):
        return node
    return {k: _without(v, keys) for k, v in node.items() if k not in keys}


def schema() -> dict[str, Any]:
    raw = ChartValues.model_json_schema(by_alias=True, mode="validation")
    body = _without(inline_refs(raw, raw.get("$defs", {})), ("title", "$defs"))
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Values of the kondense chart",
        **body,
    }


def values_schema() -> str:
    """The text of charts/kondense/values.schema.json."""
    return json.dumps(schema(), indent=2) + "\n"


def defaults() -> dict[str, Any]:
    """The values the model defaults to: what values.yaml must hold."""
    return ChartValues().model_dump(mode="json", by_alias=True)
