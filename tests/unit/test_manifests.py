"""The Job builder: security, scheduling, failure policy, multi-node shape; valid for Kubernetes (strict)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kondense.errors import PERMANENT_EXIT_CODES
from kondense.manifests import (
    ANNOTATION_RUN,
    build_cleanup_job,
    build_job,
    child_name,
    cleanup_name,
    is_cleanup,
    job_name,
    pipeline_prefix,
    service_name,
    stage_objects,
)
from kondense.plan import resolve, stage_run
from kondense.settings import Settings
from kondense.validation import load_file, parse

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings(jobs_image="registry.example/kondense-jobs:0.1.0")


def built(example: str, stage: str):
    p = load_file(ROOT / "crds/examples" / example)
    plans = resolve(p.spec, p.metadata.namespace, p.metadata.name)
    plan = next(x for x in plans if x.name == stage)
    run = stage_run(p.spec, plans, stage, p.metadata.namespace, p.metadata.name)
    name = child_name(p.metadata.name, stage, plan.input_digest)
    job = build_job(run, plan, name, p.spec.image or SETTINGS.jobs_image, SETTINGS)
    return run, plan, name, job, json.loads(job["spec"]["template"]["metadata"]["annotations"][ANNOTATION_RUN])


@pytest.mark.parametrize("example, stage", [("llama-70b-to-8b.yaml", "distill"), ("llama-70b-to-8b.yaml", "gguf"), ("demo.yaml", "eval")])
def test_manifests_pass_kubernetes_validate_strict(example, stage):
    kv = pytest.importorskip("kubernetes_validate")
    _, _, _, job, _ = built(example, stage)
    kv.validate(json.loads(json.dumps(job)), "1.33", strict=True)


def test_gpu_job_requests_gpus_tolerates_them_and_selects_nodes():
    _, _, _, job, _ = built("llama-70b-to-8b.yaml", "distill")
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"  # the stage's own override
    assert c["resources"]["limits"]["memory"] == "1200Gi"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["priorityClassName"] == "ml-batch"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "ml-team" and job["spec"]["suspend"] is True


def test_cpu_job_has_no_gpu_toleration():
    _, _, _, job, _ = built("demo.yaml", "distill")
    pod = job["spec"]["template"]["spec"]
    assert "tolerations" not in pod and "nvidia.com/gpu" not in json.dumps(pod["containers"][0]["resources"])
    assert "suspend" not in job["spec"]


def test_security_defaults():
    _, _, _, job, _ = built("llama-70b-to-8b.yaml", "nf4")
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}
    }
    assert pod["automountServiceAccountToken"] is False
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/scratch", "/home/kondense/.cache", "/dev/shm"}


def test_credentials_only_as_secret_references():
    run, _, _, job, doc = built("llama-70b-to-8b.yaml", "gptq")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "kondense-s3", "key": key, "optional": False}
        assert "value" not in env[key]
    assert "AWS_SECRET" not in json.dumps(doc) and doc["stage"] == "gptq" and doc["storage"]["credentialsSecret"] == "kondense-s3"


def test_stage_document_is_projected_from_the_pod_annotation():
    run, _, _, job, doc = built("demo.yaml", "gguf")
    pod = job["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "spec")
    assert volume["downwardAPI"]["items"][0] == {
        "path": "stage.json", "fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_RUN}']"}
    }
    assert pod["containers"][0]["args"] == ["quantize", "--spec", "/etc/kondense/stage.json", "--work-dir", "/scratch"]
    assert doc == run.dump()


def test_failure_policy_and_lifetime():
    _, plan, _, job, _ = built("llama-70b-to-8b.yaml", "eval")
    spec = job["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "stage", "operator": "In", "values": PERMANENT_EXIT_CODES}}
    assert rules[1]["action"] == "Ignore" and rules[1]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert spec["activeDeadlineSeconds"] == 172800 and spec["backoffLimit"] == 2 and spec["ttlSecondsAfterFinished"] == 86400
    c = spec["template"]["spec"]["containers"][0]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["args"][:1] == ["evaluate"] and spec["template"]["spec"]["restartPolicy"] == "Never"
    assert job["metadata"]["annotations"]["kondense.io/input-digest"] == plan.input_digest


@pytest.mark.parametrize("pipeline", ["a", "x" * 40])
def test_child_names_are_deterministic_dns_labels_within_63(pipeline):
    name = child_name(pipeline, "distill-with-a-long-name", "sha256:" + "ab" * 32)
    assert len(name) <= 63 and name == child_name(pipeline, "distill-with-a-long-name", "sha256:" + "ab" * 32)
    assert name.endswith("-abababab") and name[0].isalnum() and "--" not in name
    assert name != child_name(pipeline, "distill-with-a-long-name", "sha256:" + "cd" * 32)


def test_pvc_sources_are_mounted_read_only():
    doc = yaml.safe_load((ROOT / "crds/examples/demo.yaml").read_text())
    doc["spec"]["teacher"]["uri"] = "pvc://models/llama/70b"
    p = parse(doc)
    plans = resolve(p.spec, "default", "demo")
    run = stage_run(p.spec, plans, "distill", "default", "demo")
    job = build_job(run, plans[0], "n", "img", SETTINGS)
    pod = job["spec"]["template"]["spec"]
    assert {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    assert {"name": "pvc-models", "mountPath": "/mnt/pvc/models", "readOnly": True} in pod["containers"][0]["volumeMounts"]


def test_pvc_task_folders_are_mounted_into_the_evaluate_pod():
    doc = yaml.safe_load((ROOT / "crds/examples/demo.yaml").read_text())
    evaluate = next(s for s in doc["spec"]["stages"] if "evaluate" in s)["evaluate"]
    evaluate["tasks"][0]["uri"] = "pvc://eval-tasks/docstrings"
    p = parse(doc)
    plans = resolve(p.spec, "default", "demo")
    run = stage_run(p.spec, plans, "eval", "default", "demo")
    pod = build_job(run, plans[-1], "n", "img", SETTINGS)["spec"]["template"]["spec"]
    assert {"name": "pvc-eval-tasks", "persistentVolumeClaim": {"claimName": "eval-tasks", "readOnly": True}} in pod["volumes"]
    assert {"name": "pvc-eval-tasks", "mountPath": "/mnt/pvc/eval-tasks", "readOnly": True} in pod["containers"][0]["volumeMounts"]


def test_cleanup_job_is_valid_unprivileged_and_gets_credentials_by_reference():
    kv = pytest.importorskip("kubernetes_validate")
    p = load_file(ROOT / "crds/examples/llama-70b-to-8b.yaml")
    job = build_cleanup_job(p.metadata.name, p.metadata.namespace, p.spec.storage, SETTINGS.jobs_image, SETTINGS)
    kv.validate(json.loads(json.dumps(job)), "1.33", strict=True)
    assert is_cleanup(job) and job["metadata"]["name"] == cleanup_name(
        p.metadata.name, pipeline_prefix(p.spec.storage, p.metadata.namespace, p.metadata.name))
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "kondense_jobs.cleanup"]
    prefix = container["args"][container["args"].index("--prefix") + 1]
    assert prefix == f"{p.spec.storage.uri.rstrip('/')}/{p.metadata.namespace}/{p.metadata.name}"
    assert "nvidia.com/gpu" not in json.dumps(job) and pod["securityContext"]["runAsNonRoot"]
    assert container["securityContext"]["readOnlyRootFilesystem"] and container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    if p.spec.storage.credentials_secret:
        secret_refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e]
        assert secret_refs and set(secret_refs) == {p.spec.storage.credentials_secret}
    assert not [e for e in container["env"] if e["name"].startswith("AWS_") and "value" in e]


# -- workers and nodes ---------------------------------------------------------------------------

STAGE_ARGS = ["--spec", "/etc/kondense/stage.json", "--work-dir", "/scratch"]


def minimal_objects(name: str = "minimal", queue: str | None = None, stage: str = "distill", **resources) -> list[dict]:
    """What the operator creates for crds/examples/minimal.yaml's distill stage with these resources."""
    doc = yaml.safe_load((ROOT / "crds/examples/minimal.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["stages"][0]["name"] = stage
    doc["spec"]["resources"] = {"queueName": queue} if queue else {}
    doc["spec"]["stages"][0]["resources"] = resources
    p = parse(doc)
    plans = resolve(p.spec, p.metadata.namespace, p.metadata.name)
    return stage_objects(p.spec, plans, plans[0], p.metadata.namespace, p.metadata.name, SETTINGS)


def test_one_worker_runs_the_stage_itself_and_several_run_under_the_launcher():
    (single,) = minimal_objects(gpus=1)
    c = single["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "kondense_jobs"] and c["args"] == ["distill", *STAGE_ARGS]
    _, _, _, job, _ = built("llama-70b-to-8b.yaml", "distill")  # 8 GPUs in one pod
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "kondense_jobs.launch"]
    assert c["args"] == ["--nnodes", "1", "--nproc-per-node", "8", "--standalone", "--", "distill", *STAGE_ARGS]
    assert "completionMode" not in job["spec"] and "subdomain" not in job["spec"]["template"]["spec"]


@pytest.mark.parametrize("nodes", [1, 2], ids=["one-node", "two-nodes"])
@pytest.mark.parametrize("queue", [None, "ml-team"], ids=["no-queue", "kueue"])
def test_multi_node_stage_is_an_indexed_job_with_a_headless_service(nodes, queue):
    objects = minimal_objects(queue=queue, gpus=1, nodes=nodes)
    job = objects[-1]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    name = job["metadata"]["name"]
    # Kueue and the failure policy apply whatever the shape; /dev/shm is memory-backed for NCCL/gloo.
    assert ("suspend" in spec) is bool(queue) and spec.get("suspend", True) is True
    assert (job["metadata"]["labels"].get("kueue.x-k8s.io/queue-name")) == queue
    assert [r["action"] for r in spec["podFailurePolicy"]["rules"]] == ["FailJob", "Ignore"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    if nodes == 1:
        assert [o["kind"] for o in objects] == ["Job"]
        assert not {"completionMode", "completions", "parallelism"} & set(spec) and "subdomain" not in pod
        assert c["args"] == ["distill", *STAGE_ARGS]
        return
    service = objects[0]
    assert [o["kind"] for o in objects] == ["Service", "Job"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert pod["subdomain"] == service["metadata"]["name"] == service_name(name)
    assert c["command"] == ["python", "-m", "kondense_jobs.launch"]
    assert c["args"] == [
        "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-endpoint", f"{name}-0.{service['metadata']['name']}:29400", "--rdzv-id", name,
        "--", "distill", *STAGE_ARGS,
    ]
    assert c["ports"] == [{"name": "rdzv", "containerPort": 29400, "protocol": "TCP"}]
    assert service["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert service["spec"] == {
        "clusterIP": "None",
        "selector": {"batch.kubernetes.io/job-name": name},
        "publishNotReadyAddresses": True,
        "ports": [{"name": "rdzv", "port": 29400, "targetPort": "rdzv", "protocol": "TCP"}],
    }
    labels = {k: v for k, v in job["metadata"]["labels"].items() if k != "kueue.x-k8s.io/queue-name"}
    assert service["metadata"]["labels"] == labels  # Kueue queues the Job, not its Service


@pytest.mark.parametrize("queue", [None, "ml-team"], ids=["no-queue", "kueue"])
def test_multi_node_objects_pass_kubernetes_validate_strict(queue):
    kv = pytest.importorskip("kubernetes_validate")
    for obj in minimal_objects(queue=queue, gpus=4, nodes=3):
        kv.validate(json.loads(json.dumps(obj)), "1.33", strict=True)


@pytest.mark.parametrize(
    "pipeline, stage, nodes",
    [("minimal", "distill", 2), ("x" * 40, "y" * 24, 2), ("x" * 40, "y" * 24, 64), ("7up", "distill", 2)],
    ids=["short", "longest", "longest-64-nodes", "leading-digit"],
)
def test_multi_node_names_leave_room_for_the_pod_host_names(pipeline, stage, nodes):
    """Pod hosts `<job>-<index>` and the Service name must be DNS labels (the Service's RFC 1035)."""
    service, job = minimal_objects(name=pipeline, stage=stage, gpus=1, nodes=nodes)
    name = job["metadata"]["name"]
    label = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
    assert label.fullmatch(f"{name}-{nodes - 1}") and len(f"{name}-{nodes - 1}") <= 63
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", service["metadata"]["name"]) and len(service["metadata"]["name"]) <= 63


def test_one_node_job_names_are_unchanged():
    doc = yaml.safe_load((ROOT / "crds/examples/minimal.yaml").read_text())
    p = parse(doc)
    plan = resolve(p.spec, "ml-team", "minimal")[0]
    assert job_name("minimal", plan) == child_name("minimal", "distill", plan.input_digest)


# -- GPU fleets: scheduling, environment, local disk, GPU resource name --------------------------

ZONE = {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["eu-west-1a"]}
FLEET = {  # spec.resources of a pipeline on a MIG fleet, every pod field set
    "gpuResource": "nvidia.com/mig-3g.40gb",
    "gpuMemoryGiB": 40,
    "runtimeClassName": "nvidia",
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [ZONE]}]}}},
    "topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": {"kondense.io/pipeline": "minimal"}},
        "matchLabelKeys": ["batch.kubernetes.io/job-name"]}],
    "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            {"name": "HF_HUB_OFFLINE", "value": "0"}],
    "envFrom": [{"configMapRef": {"name": "proxy"}},
                {"prefix": "WANDB_", "secretRef": {"name": "wandb", "optional": True}}],
    "scratchSize": "800Gi",
    "shmSize": "16Gi",
}


def fleet_job(pipeline: dict, stage: dict | None = None, settings: Settings = SETTINGS) -> dict:
    """The Job of crds/examples/minimal.yaml's distill stage with these spec.resources and stage resources."""
    doc = yaml.safe_load((ROOT / "crds/examples/minimal.yaml").read_text())
    doc["spec"]["resources"] = pipeline
    if stage is not None:
        doc["spec"]["stages"][0]["resources"] = stage
    p = parse(doc)
    plans = resolve(p.spec, p.metadata.namespace, p.metadata.name)
    return stage_objects(p.spec, plans, plans[0], p.metadata.namespace, p.metadata.name, settings)[-1]


def volume(pod: dict, name: str) -> dict:
    return next(v for v in pod["volumes"] if v["name"] == name)


def own_env(container: dict) -> list[dict]:
    """The container's env past the variables kondense sets itself."""
    ours = {"HOME", "TMPDIR", "HF_HOME"}
    return [e for e in container["env"] if e["name"] not in ours and not e["name"].startswith("KONDENSE_")]


def test_gpu_fleet_fields_reach_the_stage_pod_and_are_valid_for_kubernetes():
    job = fleet_job(FLEET)
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["runtimeClassName"] == "nvidia" and pod["affinity"] == FLEET["affinity"]
    assert pod["topologySpreadConstraints"] == FLEET["topologySpreadConstraints"]
    assert c["resources"]["limits"] == {"nvidia.com/mig-3g.40gb": "1"}  # a MIG slice instead of a whole GPU
    assert [t["key"] for t in pod["tolerations"]] == ["dedicated", "nvidia.com/gpu", "nvidia.com/mig-3g.40gb"]
    assert own_env(c) == FLEET["env"] and c["env"][0] == {"name": "HOME", "value": "/home/kondense"}
    assert c["envFrom"] == FLEET["envFrom"]
    assert volume(pod, "dshm")["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(json.loads(json.dumps(job)), "1.33", strict=True)


@pytest.mark.parametrize("resources, size", [({}, "50Gi"), ({"scratchSize": "800Gi"}, "800Gi")],
                         ids=["operator-setting", "scratchSize"])
def test_local_disk_is_one_size_limited_volume_that_the_scheduler_sees_as_requested(resources, size):
    """Inputs (~/.cache) and outputs (/scratch) share one emptyDir: its size limit, which the
    scheduler does not see, is the pod's ephemeral-storage request."""
    job = fleet_job(resources, settings=Settings(jobs_image="img", scratch_size_limit="50Gi"))
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert volume(pod, "scratch")["emptyDir"] == {"sizeLimit": size}
    assert c["resources"]["requests"]["ephemeral-storage"] == size
    assert "ephemeral-storage" not in c["resources"].get("limits", {})
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/scratch"] == {"name": "scratch", "mountPath": "/scratch", "subPath": "work"}
    cache = "/home/kondense/.cache"
    assert mounts[cache] == {"name": "scratch", "mountPath": cache, "subPath": "cache"}
    disks = [v["name"] for v in pod["volumes"] if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"]
    assert disks == ["scratch"]


def test_the_cleanup_pod_requests_its_scratch_as_ephemeral_storage():
    p = load_file(ROOT / "crds/examples/minimal.yaml")
    job = build_cleanup_job(p.metadata.name, p.metadata.namespace, p.spec.storage, "img", SETTINGS)
    pod = job["spec"]["template"]["spec"]
    requests = pod["containers"][0]["resources"]["requests"]
    assert requests["ephemeral-storage"] == volume(pod, "scratch")["emptyDir"]["sizeLimit"]


def test_unset_fleet_fields_leave_the_pod_as_before():
    pod = fleet_job({"gpus": 2})["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert not {"runtimeClassName", "affinity", "topologySpreadConstraints"} & set(pod) and "envFrom" not in c
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "2"} and own_env(c) == []
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert volume(pod, "dshm")["emptyDir"] == {"medium": "Memory"}


def limits(c: dict) -> dict:
    return c["resources"]["limits"]


def keys(pod: dict) -> list[str]:
    return [t["key"] for t in pod["tolerations"]]


def scratch_sizes(pod: dict, c: dict) -> tuple[str, str]:
    return volume(pod, "scratch")["emptyDir"]["sizeLimit"], c["resources"]["requests"]["ephemeral-storage"]


@pytest.mark.parametrize(
    "stage, expect",
    [
        ({"env": [{"name": "A", "value": "1"}]}, lambda pod, c: own_env(c) == [{"name": "A", "value": "1"}]),
        ({"env": []}, lambda pod, c: own_env(c) == []),
        ({"envFrom": []}, lambda pod, c: "envFrom" not in c and own_env(c) == FLEET["env"]),
        ({"affinity": {"podAffinity": {}}}, lambda pod, c: pod["affinity"] == {"podAffinity": {}}),
        ({"topologySpreadConstraints": []}, lambda pod, c: "topologySpreadConstraints" not in pod),
        ({"gpuResource": "nvidia.com/gpu", "gpus": 2},
         lambda pod, c: (limits(c), keys(pod)) == ({"nvidia.com/gpu": "2"}, ["dedicated", "nvidia.com/gpu"])),
        ({"scratchSize": "100Gi"}, lambda pod, c: scratch_sizes(pod, c) == ("100Gi", "100Gi")),
        ({"shmSize": "1Gi"}, lambda pod, c: volume(pod, "dshm")["emptyDir"]["sizeLimit"] == "1Gi"),
        ({"runtimeClassName": "kata-nvidia"}, lambda pod, c: pod["runtimeClassName"] == "kata-nvidia"),
        ({"memory": "64Gi"},
         lambda pod, c: (pod["runtimeClassName"], pod["affinity"], c["envFrom"], limits(c)) == (
             "nvidia", FLEET["affinity"], FLEET["envFrom"], {"nvidia.com/mig-3g.40gb": "1", "memory": "64Gi"})),
    ],
    ids=["env", "env-cleared", "envFrom-cleared", "affinity", "spread-cleared", "gpu-resource", "scratch",
         "shm", "runtime-class", "others-inherited"],
)
def test_a_stage_value_replaces_the_pipelines_and_the_rest_is_inherited(stage, expect):
    pod = fleet_job(FLEET, stage)["spec"]["template"]["spec"]
    assert expect(pod, pod["containers"][0])
