"""Operator settings: read once from the environment at startup; nowhere else reads os.environ."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

PREFIX = "kondense.io"


@dataclass(frozen=True)
class Settings:
    jobs_image: str = "ghcr.io/kondense/kondense-jobs:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    namespaces: tuple[str, ...] = ()  # empty: every namespace (cluster-wide)
    job_service_account: str = "kondense-job"
    ttl_seconds_after_finished: int = 86400
    liveness_port: int = 8080
    peering: str | None = None  # None: standalone (one replica); a name: kopf peering for HA
    scratch_size_limit: str = "200Gi"
    log_level: str = "INFO"
    progress_seconds: int = 30  # how often running stages' logs are read for progress; 0: never
    extra_labels: dict[str, str] = field(default_factory=dict)
    # Prefixes of the images a pipeline's spec.image may name, e.g. ("registry.example/ml/",); empty:
    # any image. The operator's own jobs_image is always allowed.
    allowed_images: tuple[str, ...] = ()

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

        def listed(name: str) -> tuple[str, ...]:
            return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())

        return cls(
            jobs_image=env.get("KONDENSE_JOBS_IMAGE", cls.jobs_image),
            image_pull_policy=env.get("KONDENSE_IMAGE_PULL_POLICY", cls.image_pull_policy),
            namespaces=listed("KONDENSE_NAMESPACES"),
            job_service_account=env.get("KONDENSE_JOB_SERVICE_ACCOUNT", cls.job_service_account),
            ttl_seconds_after_finished=integer("KONDENSE_JOB_TTL_SECONDS", cls.ttl_seconds_after_finished),
            liveness_port=integer("KONDENSE_LIVENESS_PORT", cls.liveness_port),
            peering=env.get("KONDENSE_PEERING") or None,
            scratch_size_limit=env.get("KONDENSE_SCRATCH_SIZE_LIMIT", cls.scratch_size_limit),
            log_level=env.get("KONDENSE_LOG_LEVEL", cls.log_level).upper(),
            progress_seconds=integer("KONDENSE_PROGRESS_SECONDS", cls.progress_seconds),
            allowed_images=listed("KONDENSE_ALLOWED_IMAGES"),
        )
