"""500 pipelines applied at once against a real kube-apiserver: how fast do their first Jobs exist?

Side by side in one run, on one control plane (etcd + kube-apiserver from tests/cluster):
  direct    the client creates the same 500 first-stage Jobs itself, one after another
  operator  the client creates 500 CompressionPipelines, one after another, while the operator
            (`python -m kondense.operator`, a separate process) plans each and creates its Job
Prints both times and the ratio operator/direct (target <= 1.5), the operator's peak RSS
(target <= 200 MB) and API requests per pipeline (from the API server's audit log).

    python benchmarks/operator_scale.py [--pipelines 500]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from kubernetes import client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
from controlplane import ControlPlane, free_port, wait_for  # noqa: E402
from operator_harness import install_crd  # noqa: E402

from kondense import api  # noqa: E402
from kondense.manifests import build_job, child_name  # noqa: E402
from kondense.plan import resolve, stage_run  # noqa: E402
from kondense.settings import Settings  # noqa: E402
from kondense.validation import parse  # noqa: E402

OPERATOR_USER = "kondense-operator"
AUDIT_POLICY = "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n"


def pipeline(name: str) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": {
            "teacher": {"uri": "s3://models/teacher"},
            "student": {"uri": "s3://models/student"},
            "dataset": {"uri": "s3://data/prompts.jsonl"},
            "storage": {"uri": "s3://artifacts/runs"},
            "stages": [
                {"name": "distill", "distill": {"method": "logits"}},
                {"name": "gguf", "quantize": {"method": "gguf", "type": "q4_k_m"}},
            ],
        },
    }


def first_job(doc: dict, namespace: str, settings: Settings) -> dict:
    p = parse({**doc, "metadata": {**doc["metadata"], "namespace": namespace}})
    plans = resolve(p.spec, namespace, p.metadata.name)
    run = stage_run(p.spec, plans, plans[0].name, namespace, p.metadata.name)
    name = child_name(p.metadata.name, plans[0].name, plans[0].input_digest)
    return build_job(run, plans[0], name, settings.jobs_image, settings)


def count_jobs(batch: client.BatchV1Api, namespace: str) -> int:
    import json

    return len(json.loads(batch.list_namespaced_job(namespace, _preload_content=False).data)["items"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipelines", type=int, default=500)
    args = ap.parse_args()
    n = args.pipelines
    settings = Settings(jobs_image="kondense-jobs:bench")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"kondense-scale-{os.getpid()}"
    work.mkdir(parents=True)
    (work / "audit-policy.yaml").write_text(AUDIT_POLICY)
    audit_log = work / "audit.log"
    cp = ControlPlane(
        users={OPERATOR_USER: ["system:masters"]},
        controllers=("namespace-controller",),  # no Job controller: we measure Job creation, not pods
        apiserver_flags=(f"--audit-policy-file={work / 'audit-policy.yaml'}", f"--audit-log-path={audit_log}",
                         "--max-requests-inflight=800", "--max-mutating-requests-inflight=400"),
    )
    with cp:
        admin = cp.api_client()
        admin.configuration.connection_pool_maxsize = 16
        core, batch, custom = client.CoreV1Api(admin), client.BatchV1Api(admin), client.CustomObjectsApi(admin)
        install_crd(admin)
        for ns in ("bench-direct", "bench-operator"):
            core.create_namespace({"metadata": {"name": ns}})
        docs = [pipeline(f"p{i:04d}") for i in range(n)]

        # direct: the client creates each pipeline's first Job itself.
        objects = [first_job(d, "bench-direct", settings) for d in docs]
        started = time.perf_counter()
        for job in objects:
            batch.create_namespaced_job("bench-direct", job)
        direct = time.perf_counter() - started

        # operator: a separate process, as the chart runs it.
        kubeconfig = cp.kubeconfig_for(cp.token_for(OPERATOR_USER), name=OPERATOR_USER)
        env = {**os.environ, "KUBECONFIG": kubeconfig, "KONDENSE_JOBS_IMAGE": settings.jobs_image,
               "KONDENSE_LIVENESS_PORT": str(free_port()), "KONDENSE_LOG_LEVEL": "WARNING",
               "KONDENSE_NAMESPACES": "bench-operator"}
        log = open(work / "operator.log", "w")
        op = subprocess.Popen([sys.executable, "-m", "kondense.operator"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: b"kondense-operator" in audit_log.read_bytes() if audit_log.exists() else False,
                     timeout=60, what="the operator to start watching")
            time.sleep(2)  # let kopf finish its initial listings before the clock starts
            cpu_before = cpu_seconds(op.pid)
            started = time.perf_counter()
            for d in docs:
                custom.create_namespaced_custom_object(api.GROUP, api.VERSION, "bench-operator", api.PLURAL, d)
            applied = time.perf_counter() - started
            wait_for(lambda: count_jobs(batch, "bench-operator") >= n, timeout=900, what=f"{n} Jobs")
            through_operator = time.perf_counter() - started
            rss_mb = peak_rss_mb(op.pid)
            cpu = cpu_seconds(op.pid) - cpu_before
        finally:
            op.terminate()
            op.wait(30)
            log.close()
        requests = sum(1 for line in audit_log.read_text().splitlines() if f'"username":"{OPERATOR_USER}"' in line
                       and '"stage":"ResponseComplete"' in line)
    print(f"{n} pipelines, first-stage Job each, one kube-apiserver, 2 cores")
    print(f"direct:   {direct:6.1f}s  client creates {n} Jobs")
    print(f"operator: {through_operator:6.1f}s  {n} pipelines applied in {applied:.1f}s, Jobs by the operator")
    print(f"ratio operator/direct: {through_operator / direct:.2f} (target <= 1.5)")
    print(f"operator CPU: {cpu:.1f}s = {cpu / n * 1000:.0f} ms per pipeline")
    print(f"operator peak RSS: {rss_mb:.0f} MB (target <= 200 MB)")
    print(f"API requests by the operator: {requests} = {requests / n:.1f} per pipeline (watches and kopf's own included)")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    main()
