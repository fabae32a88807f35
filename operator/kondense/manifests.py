"""Pure builders: a planned stage -> its batch/v1 Job (and, for several nodes, a headless Service).

No I/O; reconcile adopts what these return and creates it.

The StageRun document travels inside the Job, as a pod annotation that the downward API
projects into /etc/kondense/stage.json: one object per stage to create, nothing to clean up,
and the document is immutable with the Job.

A distill stage on several nodes (`resources.nodes` > 1) is an Indexed Job: one pod per node,
each named `<job>-<index>` by the Job controller in the subdomain of a headless Service, so
that every pod reaches the c10d rendezvous of torch's launcher at `<job>-0.<service>`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from urllib.parse import urlparse

from kondense import api
from kondense.errors import PERMANENT_EXIT_CODES, InvalidSpec
from kondense.launch import RDZV_PORT, rendezvous_endpoint, stage_command
from kondense.plan import StagePlan, stage_run
from kondense.settings import PREFIX, Settings
from kondense.store import join, short

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
# On a stage's Job: plan.run_digest (resources, image, storage access, retry token) it was built with.
ANNOTATION_RUN_DIGEST = f"{PREFIX}/run-digest"
# On a pipeline: a new value re-runs its failed stages (`kubectl annotate cpl x kondense.io/retry=$(date +%s)`).
ANNOTATION_RETRY = f"{PREFIX}/retry"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Set by the Job controller on the pods of every Job, and on an Indexed Job's pods their index
# (as a label since Kubernetes 1.28, as an annotation always).
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
RDZV_PORT_NAME = "rdzv"
GPU = "nvidia.com/gpu"
CLEANUP = "cleanup"
CLEANUP_SCRATCH = "1Gi"


def child_name(pipeline: str, stage: str, digest: str, max_len: int = MAX_NAME) -> str:
    """`<pipeline>-<stage>-<digest8>`, shortened with a hash to stay within `max_len` characters."""
    tail = f"-{short(digest)[:8]}"
    base = f"{pipeline}-{stage}"
    if len(base) + len(tail) > max_len:
        h = hashlib.sha256(base.encode()).hexdigest()[:6]
        base = f"{base[: max_len - len(tail) - 7].rstrip('-')}-{h}"
    return base + tail


def job_name(pipeline: str, plan: StagePlan) -> str:
    """The Job of a planned stage: `child_name`, leaving room for the index on several nodes.

    The pods of an Indexed Job get the host names `<job>-<index>`, DNS labels of at most 63
    characters: the API server refuses an Indexed Job whose last host name would be longer.
    """
    if plan.resources.nodes == 1:
        return child_name(pipeline, plan.name, plan.input_digest)
    room = len(f"-{plan.resources.nodes - 1}")
    return child_name(pipeline, plan.name, plan.input_digest, MAX_NAME - room)


def service_name(job: str) -> str:
    """The headless Service of a multi-node Job: the Job's own name, which `kubectl get svc` shows
    next to it. A Service name must begin with a letter (RFC 1035), a Job name need not."""
    return job if job[:1].isalpha() else f"s-{job}"  # a multi-node Job's name leaves the room


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
    if run.evaluate is not None:  # task folders (YAML + JSONL, or a datasets cache)
        uris += [t.uri for t in run.evaluate.tasks if t.uri]
    return sorted({urlparse(u).netloc for u in uris if u.startswith("pvc://")})


def _credentials_env(storage: api.Storage) -> list[dict]:
    if not storage.credentials_secret:
        return []
    keys = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True))
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": storage.credentials_secret, "key": key, "optional": optional}}}
        for key, optional in keys
    ]


def gpu_resource(r: api.Resources) -> str:
    """The extended resource a stage's GPUs are requested as: resources.gpuResource, else nvidia.com/gpu."""
    return r.gpu_resource or GPU


def scratch_size(r: api.Resources, settings: Settings) -> str:
    """A stage pod's local disk: resources.scratchSize, else the operator's setting."""
    return r.scratch_size or settings.scratch_size_limit


def _resources(r: api.Resources, scratch: str) -> dict:
    """Requests and limits; ephemeral-storage requested as large as the emptyDir's size limit, which
    the scheduler does not see (it places pods by requests only)."""
    limits: dict[str, str] = {}
    requests: dict[str, str] = {"ephemeral-storage": scratch}
    if r.gpus:
        limits[gpu_resource(r)] = str(r.gpus)
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
    """The pipeline's tolerations, and with GPUs those of GPU nodes: the nvidia.com/gpu taint that
    GPU node pools carry (MIG ones too), and one keyed by the GPU resource's name, the convention
    of Kubernetes' ExtendedResourceToleration admission plugin."""
    tolerations = [t.dump() for t in r.tolerations]
    if r.gpus:
        for key in dict.fromkeys((GPU, gpu_resource(r))):
            if not any(t.get("key") == key for t in tolerations):
                tolerations.append({"key": key, "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def _shm(r: api.Resources) -> dict:
    """/dev/shm: memory-backed, limited by resources.shmSize, else only by the pod's memory limit."""
    return {"medium": "Memory", "sizeLimit": r.shm_size} if r.shm_size else {"medium": "Memory"}


def _env(storage: api.Storage) -> list[dict]:
    return [
        {"name": "HOME", "value": HOME},
        {"name": "TMPDIR", "value": SCRATCH},
        {"name": "HF_HOME", "value": f"{HOME}/.cache/huggingface"},
        {"name": "KONDENSE_CACHE", "value": f"{HOME}/.cache/kondense"},
        {"name": "KONDENSE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "KONDENSE_TERMINATION_LOG", "value": "/dev/termination-log"},
        *_credentials_env(storage),
    ]


def _container(image: str, settings: Settings, command: list[str], args: list[str], env: list[dict],
               resources: dict, mounts: list[dict]) -> dict:
    """The one container of a kondense pod: non-root, read-only root, no capabilities."""
    return {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "args": args,
        "env": env,
        "resources": resources,
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


def _pod_spec(settings: Settings, container: dict, volumes: list[dict]) -> dict:
    return {
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


def _job(name: str, namespace: str, job_labels: dict[str, str], annotations: dict[str, str],
         pod_annotations: dict[str, str], pod_spec: dict, backoff_limit: int, deadline: int | None,
         settings: Settings) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": job_labels, "annotations": annotations},
        "spec": {
            "backoffLimit": backoff_limit,
            "activeDeadlineSeconds": deadline,
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
            "template": {"metadata": {"labels": job_labels, "annotations": pod_annotations}, "spec": pod_spec},
        },
    }


def _stage_argv(kind: str, r: api.Resources, job: str, sharded: bool = False) -> list[str]:
    """`python -m kondense_jobs <kind> ...`, under torch's launcher when the stage has several workers
    or is sharded; on several nodes the workers meet at the c10d store of the pod of index 0, run id = the Job."""
    rendezvous = (rendezvous_endpoint(job, service_name(job)), job) if r.nodes > 1 else None
    stage_args = ["--spec", f"{SPEC_DIR}/{SPEC_FILE}", "--work-dir", SCRATCH]
    return stage_command(kind, stage_args, r, rendezvous=rendezvous, sharded=sharded)


def _indexed(job: dict, nodes: int, service: str) -> dict:
    """One pod per node. The Job controller names each pod's host `<job>-<index>`; the subdomain
    puts those names in the headless Service's DNS zone, where the other pods look them up."""
    spec = job["spec"]
    spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
    pod = spec["template"]["spec"]
    pod["subdomain"] = service
    pod["containers"][0]["ports"] = [{"name": RDZV_PORT_NAME, "containerPort": RDZV_PORT, "protocol": "TCP"}]
    return job


def build_job(run: api.StageRun, plan: StagePlan, name: str, image: str, settings: Settings) -> dict:
    """The stage's Job: non-root, the StageRun mounted, credentials by reference only. One pod, or
    for a multi-node stage an Indexed Job of one pod per node (see `build_service`)."""
    r = plan.resources
    volumes = [
        {
            "name": "spec",
            "downwardAPI": {
                "items": [{"path": SPEC_FILE, "fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_RUN}']"}}]
            },
        },
        # One local disk for the downloaded inputs and the outputs: one size limit covers both,
        # and the ephemeral-storage request says it to the scheduler.
        {"name": "scratch", "emptyDir": {"sizeLimit": scratch_size(r, settings)}},
        {"name": "dshm", "emptyDir": _shm(r)},
    ]
    mounts = [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH, "subPath": "work"},
        {"name": "scratch", "mountPath": f"{HOME}/.cache", "subPath": "cache"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    for claim in _pvc_claims(run):
        volumes.append({"name": f"pvc-{claim}"[:63], "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"pvc-{claim}"[:63], "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
    argv = _stage_argv(run.stage_kind, r, name, run.sharded)
    container = _container(
        image, settings, argv[:3], argv[3:],  # `python -m <module>` | its arguments
        [*_env(run.storage), *(v.dump() for v in r.env)], _resources(r, scratch_size(r, settings)), mounts,
    )
    if r.env_from:
        container["envFrom"] = [s.dump() for s in r.env_from]
    pod_spec = _pod_spec(settings, container, volumes)
    if r.node_selector:
        pod_spec["nodeSelector"] = dict(r.node_selector)
    if tolerations := _tolerations(r):
        pod_spec["tolerations"] = tolerations
    if r.priority_class_name:
        pod_spec["priorityClassName"] = r.priority_class_name
    if r.runtime_class_name:
        pod_spec["runtimeClassName"] = r.runtime_class_name
    if r.affinity is not None and (affinity := r.affinity.dump()):
        pod_spec["affinity"] = affinity
    if r.topology_spread_constraints:
        pod_spec["topologySpreadConstraints"] = [c.dump() for c in r.topology_spread_constraints]
    job = _job(
        name, run.namespace, labels(run.pipeline, plan, settings), {ANNOTATION_DIGEST: plan.input_digest},
        {ANNOTATION_RUN: json.dumps(run.dump(), sort_keys=True, separators=(",", ":"))},
        pod_spec, r.backoff_limit, r.active_deadline_seconds, settings,
    )
    if r.nodes > 1:
        _indexed(job, r.nodes, service_name(name))
    if r.queue_name:
        job["spec"]["suspend"] = True  # Kueue admits (unsuspends) the Job when its quota allows
    return job


def build_service(job: dict) -> dict:
    """The headless Service of a multi-node Job: it gives the Job's pods their DNS names.

    `<job>-<index>.<service>` resolves to that pod's IP from the moment it has one
    (publishNotReadyAddresses: the rendezvous happens before any readiness could be known).
    No cluster IP, nothing load-balanced: torch's c10d rendezvous listens on index 0 and tells
    every worker the addresses it needs. Labelled like the Job, Kueue's queue label aside.
    """
    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": job["spec"]["template"]["spec"]["subdomain"],
            "namespace": meta["namespace"],
            "labels": {k: v for k, v in meta["labels"].items() if k != QUEUE_LABEL},
        },
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_NAME_LABEL: meta["name"]},
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": RDZV_PORT_NAME, "port": RDZV_PORT, "targetPort": RDZV_PORT_NAME, "protocol": "TCP"}
            ],
        },
    }


def stage_job(spec: api.PipelineSpec, plans: list[StagePlan], plan: StagePlan, namespace: str, pipeline: str,
              settings: Settings, reasons: Mapping[str, str] | None = None) -> dict:
    """The Job of one planned stage, named and built exactly as the operator creates it; `reasons`:
    why the inputs it runs without (plan.missing) are missing."""
    run = stage_run(spec, plans, plan.name, namespace, pipeline, reasons)
    return build_job(run, plan, job_name(pipeline, plan), jobs_image(spec, settings), settings)


def jobs_image(spec: api.PipelineSpec, settings: Settings) -> str:
    """The image of a pipeline's Jobs: spec.image, else the operator's. Raises InvalidSpec for a
    spec.image that the operator's allowed prefixes do not cover (the operator's own is always allowed)."""
    if spec.image is None or settings.image_allowed(spec.image):
        return spec.image or settings.jobs_image
    raise InvalidSpec(
        f"spec.image: {spec.image!r} is not allowed by the operator's setting KONDENSE_ALLOWED_IMAGES "
        f"(chart value jobs.allowedImages), which allows images starting with: "
        f"{', '.join(settings.allowed_images)}. To resolve, use such an image, or leave spec.image out to "
        f"run the operator's jobs image {settings.jobs_image}"
    )


def stage_objects(spec: api.PipelineSpec, plans: list[StagePlan], plan: StagePlan, namespace: str,
                  pipeline: str, settings: Settings, reasons: Mapping[str, str] | None = None) -> list[dict]:
    """What the operator creates for one planned stage, in order: a multi-node stage's Service
    first (its pods find each other through it), then the Job."""
    job = stage_job(spec, plans, plan, namespace, pipeline, settings, reasons)
    return [build_service(job), job] if plan.resources.nodes > 1 else [job]


def pipeline_prefix(storage: api.Storage, namespace: str, pipeline: str) -> str:
    """Everything a pipeline ever published lies under this prefix (see store.artifact_uri)."""
    return join(storage.uri, namespace, pipeline)


def cleanup_name(pipeline: str, prefix: str) -> str:
    return child_name(pipeline, CLEANUP, hashlib.sha256(prefix.encode()).hexdigest())


def build_cleanup_job(pipeline: str, namespace: str, storage: api.Storage, image: str, settings: Settings) -> dict:
    """The Job that deletes a pipeline's artifacts (spec.storage.deletionPolicy: Delete).

    The operator never holds storage credentials: like the stages, this pod gets them from the
    pipeline's Secret by reference.
    """
    prefix = pipeline_prefix(storage, namespace, pipeline)
    args = ["--prefix", prefix]
    if storage.endpoint:
        args += ["--endpoint", storage.endpoint]
    if storage.region:
        args += ["--region", storage.region]
    container = _container(
        image, settings, ["python", "-m", "kondense_jobs.cleanup"], args, _env(storage),
        {"requests": {"cpu": "100m", "memory": "256Mi", "ephemeral-storage": CLEANUP_SCRATCH},
         "limits": {"memory": "512Mi"}},
        [{"name": "scratch", "mountPath": SCRATCH}],
    )
    job_labels = {
        "app.kubernetes.io/name": "kondense",
        "app.kubernetes.io/component": CLEANUP,
        "app.kubernetes.io/managed-by": "kondense-operator",
        LABEL_PIPELINE: pipeline,
        **settings.extra_labels,
    }
    scratch = {"name": "scratch", "emptyDir": {"sizeLimit": CLEANUP_SCRATCH}}
    pod_spec = _pod_spec(settings, container, [scratch])
    return _job(cleanup_name(pipeline, prefix), namespace, job_labels, {}, {}, pod_spec, 3, 3600, settings)


def is_cleanup(job: dict) -> bool:
    return (job["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == CLEANUP
