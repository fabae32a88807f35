"""The Job builder: security, scheduling, failure policy; valid for Kubernetes (strict)."""

from __future__ import annotations

import json
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
    pipeline_prefix,
)
from kondense.plan import resolve, stage_run
from kondense.settings import Settings
from kondense.validation import load_file

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
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"  # the stage's own override
    assert c["resources"]["limits"]["memory"] == "600Gi"
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
    from kondense.validation import parse

    p = parse(doc)
    plans = resolve(p.spec, "default", "demo")
    run = stage_run(p.spec, plans, "distill", "default", "demo")
    job = build_job(run, plans[0], "n", "img", SETTINGS)
    pod = job["spec"]["template"]["spec"]
    assert {"name": "pvc-models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    assert {"name": "pvc-models", "mountPath": "/mnt/pvc/models", "readOnly": True} in pod["containers"][0]["volumeMounts"]


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
