"""Operator settings: read once from the environment at startup; nowhere else reads os.environ."""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from dataclasses import dataclass, field

PREFIX = "kondense.io"
HEALTH_PATH = "/healthz"  # the liveness endpoint's path


@dataclass(frozen=True)
class Election:
    """Leader election through a coordination.k8s.io/v1 Lease (kondense.leader): of all the
    replicas, only the holder of the Lease runs the operator; the others wait, healthy."""

    lease: str  # the Lease's name
    namespace: str  # where the Lease lives: the operator's own namespace
    identity: str  # this replica's name as the Lease's holder: unique among the replicas
    lease_duration: float = 15.0  # a candidate takes the Lease after seeing it unrenewed this long
    renew_deadline: float = 10.0  # the holder exits when it has not renewed for this long
    retry_period: float = 2.0  # how often the holder renews and a candidate looks

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline > self.retry_period > 0:
            raise ValueError(
                f"leader election needs leaseDuration > renewDeadline > retryPeriod > 0, got "
                f"{self.lease_duration:g} s, {self.renew_deadline:g} s, {self.retry_period:g} s: the "
                "holder must stop before a candidate may take over"
            )


@dataclass(frozen=True)
class Settings:
    jobs_image: str = "ghcr.io/kondense/kondense-jobs:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    namespaces: tuple[str, ...] = ()  # empty: every namespace (cluster-wide)
    job_service_account: str = "kondense-job"
    ttl_seconds_after_finished: int = 86400
    # Address the liveness endpoint binds to: 0.0.0.0 (IPv4) or :: (IPv6 and dual stack) for the
    # kubelet's probe, which calls the pod's IP; 127.0.0.1 only where nothing probes from outside.
    liveness_host: str = "0.0.0.0"
    liveness_port: int = 8080
    metrics_port: int = 8081  # /metrics and /readyz, on liveness_host; 0: not served
    election: Election | None = None  # None: no leader election (exactly one replica)
    scratch_size_limit: str = "200Gi"
    log_level: str = "INFO"
    progress_seconds: int = 30  # how often running stages' logs are read for progress; 0: never
    extra_labels: dict[str, str] = field(default_factory=dict)
    # Prefixes of the images a pipeline's spec.image may name, e.g. ("registry.example/ml/",); empty:
    # any image. The operator's own jobs_image is always allowed.
    allowed_images: tuple[str, ...] = ()

    @property
    def liveness_endpoint(self) -> str:
        host = f"[{self.liveness_host}]" if ":" in self.liveness_host else self.liveness_host
        return f"http://{host}:{self.liveness_port}{HEALTH_PATH}"

    def image_allowed(self, image: str) -> bool:
        return not self.allowed_images or image == self.jobs_image or image.startswith(self.allowed_images)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)

        def integer(name: str, default: int) -> int:
            raw = env.get(name)
            if raw is None:
                return default
            try:
                return int(raw)
            except ValueError:
                raise SystemExit(f"{name}={raw!r}: expected an integer") from None

        def election() -> Election | None:
            enabled = env.get("KONDENSE_LEADER_ELECTION", "false").lower()
            if enabled not in ("true", "false"):
                raise SystemExit(f"KONDENSE_LEADER_ELECTION={enabled!r}: expected true or false")
            if enabled == "false":
                return None
            namespace = env.get("POD_NAMESPACE", "")
            if not namespace:
                raise SystemExit(
                    "KONDENSE_LEADER_ELECTION=true needs POD_NAMESPACE, the namespace of the Lease (the "
                    "chart sets it from the downward API's metadata.namespace)"
                )
            try:
                return Election(
                    lease=env.get("KONDENSE_LEASE_NAME") or "kondense",
                    namespace=namespace,
                    # Unique per replica: the pod's name, else this host and a random suffix.
                    identity=env.get("POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}",
                    lease_duration=integer("KONDENSE_LEASE_DURATION_SECONDS", int(Election.lease_duration)),
                    renew_deadline=integer("KONDENSE_RENEW_DEADLINE_SECONDS", int(Election.renew_deadline)),
                    retry_period=integer("KONDENSE_RETRY_PERIOD_SECONDS", int(Election.retry_period)),
                )
            except ValueError as e:
                raise SystemExit(str(e)) from None

        def address(name: str, default: str) -> str:
            raw = env.get(name) or default
            try:
                return str(ipaddress.ip_address(raw))
            except ValueError:
                raise SystemExit(
                    f"{name}={raw!r}: expected an IP address to bind to, e.g. 0.0.0.0 (every IPv4 "
                    "address), :: (every address, IPv6 and dual stack) or 127.0.0.1"
                ) from None

        def port(name: str, default: int) -> int:
            value = integer(name, default)
            if not 1 <= value <= 65535:
                raise SystemExit(f"{name}={value}: expected a port from 1 to 65535")
            return value

        def listed(name: str) -> tuple[str, ...]:
            return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())

        return cls(
            jobs_image=env.get("KONDENSE_JOBS_IMAGE", cls.jobs_image),
            image_pull_policy=env.get("KONDENSE_IMAGE_PULL_POLICY", cls.image_pull_policy),
            namespaces=listed("KONDENSE_NAMESPACES"),
            job_service_account=env.get("KONDENSE_JOB_SERVICE_ACCOUNT", cls.job_service_account),
            ttl_seconds_after_finished=integer("KONDENSE_JOB_TTL_SECONDS", cls.ttl_seconds_after_finished),
            liveness_host=address("KONDENSE_LIVENESS_HOST", cls.liveness_host),
            liveness_port=port("KONDENSE_LIVENESS_PORT", cls.liveness_port),
            metrics_port=0 if env.get("KONDENSE_METRICS_PORT") == "0" else port("KONDENSE_METRICS_PORT", cls.metrics_port),
            election=election(),
            scratch_size_limit=env.get("KONDENSE_SCRATCH_SIZE_LIMIT", cls.scratch_size_limit),
            log_level=env.get("KONDENSE_LOG_LEVEL", cls.log_level).upper(),
            progress_seconds=integer("KONDENSE_PROGRESS_SECONDS", cls.progress_seconds),
            allowed_images=listed("KONDENSE_ALLOWED_IMAGES"),
        )
