"""Pure builder: a planned stage -> its batch/v1 Job. No I/O; handlers adopt it and create it.

The StageRun document travels inside the Job, as a pod annotation that the downward API
projects into /etc/kondense/stage.json: one object per stage to create, nothing to clean up,
and the document is immutable with the Job.
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import urlparse

from kondense import api
from kondense.errors import PERMANENT_EXIT_CODES
from kondense.plan import StagePlan
from kondense.settings import PREFIX, Settings
from kondense.store import short

CONTAINER = "stage"
SPEC_DIR = "/etc/kondense"
SPEC_FILE = "stage.json"
SCRATCH = "/scratch"
HOME = "/home/kondense"
PVC_ROOT = "/mnt/pvc"
UID = 65532
MAX_NAME = 63

LABEL_PIPELINE = f"{PREFIX}/pipeline"
LABEL_STAGE = f"{PREFIX}/stage"
LABEL_DIGEST = f"{PREFIX}/digest"
ANNOTATION_DIGEST = f"{PREFIX}/input-digest"
ANNOTATION_RUN = f"{PREFIX}/stage-run"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GPU = "nvidia.com/gpu"


def child_name(pipeline: str, stage: str, digest: str) -> str:
    """`<pipeline>-<stage>-<digest8>`, shortened with a hash to stay within 63 characters."""
    tail = f"-{short(digest)[:8]}"
    base = f"{pipeline}-{stage}"
    if len(base) + len(tail) > MAX_NAME:
        h = hashlib.sha256(base.encode()).hexdigest()[:6]
        base = f"{base[: MAX_NAME - len(tail) - 7].rstrip('-')}-{h}"
    return base + tail


def labels(pipeline: str, plan: StagePlan, settings: Settings) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "kondense",
        "app.kubernetes.io/component": "stage",
        "app.kubernetes.io/managed-by": "kondense-operator",
        LABEL_PIPELINE: pipeline,
        LABEL_STAGE: plan.name,
        LABEL_DIGEST: short(plan.input_digest),
        **settings.extra_labels,
    }
    if plan.resources.queue_name:
        out[QUEUE_LABEL] = plan.resources.queue_name
    return out


def _pvc_claims(run: api.StageRun) -> list[str]:
    uris = [m.uri for m in run.models.values()] + [run.dataset.uri]
    return sorted({urlparse(u).netloc for u in uris if u.startswith("pvc://")})


def _credentials_env(storage: api.Storage) -> list[dict]:
    if not storage.credentials_secret:
        return []
    keys = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": storage.credentials_secret, "key": key, "optional": optional}}}
        for key, optional in keys
    ]


def _resources(r: api.Resources) -> dict:
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if r.gpus:
        limits[GPU] = str(r.gpus)
    for key, value in (("cpu", r.cpu), ("memory", r.memory)):
        if value:
            limits[key] = requests[key] = value
    out = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def _tolerations(r: api.Resources) -> list[dict]:
    tolerations = [t.dump() for t in r.tolerations]
    if r.gpus and not any(t.get("key") == GPU for t in tolerations):
        tolerations.append({"key": GPU, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def build_job(run: api.StageRun, plan: StagePlan, name: str, image: str, settings: Settings) -> dict:
    """The stage's Job: one pod, non-root, the StageRun mounted, credentials by reference only."""
    r = plan.resources
    stage_labels = labels(run.pipeline, plan, settings)
    volumes = [
        {
            "name": "spec",
            "downwardAPI": {
                "items": [{"path": SPEC_FILE, "fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_RUN}']"}}]
            },
        },
        {"name": "scratch", "emptyDir": {"sizeLimit": settings.scratch_size_limit}},
        {"name": "cache", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH},
        {"name": "cache", "mountPath": f"{HOME}/.cache"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    for claim in _pvc_claims(run):
        volumes.append({"name": f"pvc-{claim}"[:63], "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"pvc-{claim}"[:63], "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
    env = [
        {"name": "HOME", "value": HOME},
        {"name": "TMPDIR", "value": SCRATCH},
        {"name": "HF_HOME", "value": f"{HOME}/.cache/huggingface"},
        {"name": "KONDENSE_CACHE", "value": f"{HOME}/.cache/kondense"},
        {"name": "KONDENSE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "KONDENSE_TERMINATION_LOG", "value": "/dev/termination-log"},
        *_credentials_env(run.storage),
    ]
    container = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "kondense_jobs"],
        "args": [run.stage_kind, "--spec", f"{SPEC_DIR}/{SPEC_FILE}", "--work-dir", SCRATCH],
        "env": env,
        "resources": _resources(r),
        "volumeMounts": mounts,
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.job_service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if r.node_selector:
        pod_spec["nodeSelector"] = dict(r.node_selector)
    if tolerations := _tolerations(r):
        pod_spec["tolerations"] = tolerations
    if r.priority_class_name:
        pod_spec["priorityClassName"] = r.priority_class_name
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": run.namespace,
            "labels": stage_labels,
            "annotations": {ANNOTATION_DIGEST: plan.input_digest},
        },
        "spec": {
            "backoffLimit": r.backoff_limit,
            "activeDeadlineSeconds": r.active_deadline_seconds,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": PERMANENT_EXIT_CODES},
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                ]
            },
            "template": {
                "metadata": {
                    "labels": stage_labels,
                    "annotations": {ANNOTATION_RUN: json.dumps(run.dump(), sort_keys=True, separators=(",", ":"))},
                },
                "spec": pod_spec,
            },
        },
    }
    if r.queue_name:
        job["spec"]["suspend"] = True  # Kueue admits (unsuspends) the Job when its quota allows
    return job
