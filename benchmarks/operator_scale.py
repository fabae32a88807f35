"""500 pipelines applied at once against a real kube-apiserver: how fast do their first Jobs exist?

Side by side in one run, on one control plane (etcd + kube-apiserver from tests/cluster), after
a warm-up of both paths:
  direct    the client creates the same 500 first-stage Jobs itself, one after another
  alone     the client creates the 500 CompressionPipelines with no operator running
  floor     the client makes, one after another, the writes any operator must make per
            pipeline: the pipeline, its Job and one status write (no operator running)
  operator  the client creates 500 CompressionPipelines, one after another, while the operator
            (`python -m kondense.operator`, a separate process) plans each and creates its Job
Prints the times, the ratio operator/direct (target <= 1.5), floor/direct (what any operator
would cost on this machine) and operator/floor, CPU seconds per process in each phase, the
operator's peak RSS (target <= 200 MB) and its API requests per pipeline by kind (audit log).
Everything shares this machine's cores, so the API server's CPU is part of every figure.

    python benchmarks/operator_scale.py [--pipelines 500]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from kubernetes import client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))
from controlplane import ControlPlane, free_port, wait_for  # noqa: E402
from operator_harness import install_crd  # noqa: E402

from kondense import api  # noqa: E402
from kondense.manifests import stage_job  # noqa: E402
from kondense.plan import resolve  # noqa: E402
from kondense.settings import Settings  # noqa: E402
from kondense.validation import parse  # noqa: E402

OPERATOR_USER = "kondense-operator"
AUDIT_POLICY = "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n"


def pipeline(name: str) -> dict:
    """crds/examples/minimal.yaml (distill, then gguf) as `name`."""
    doc = yaml.safe_load((ROOT / "crds" / "examples" / "minimal.yaml").read_text())
    doc["metadata"] = {"name": name}
    return doc


def first_job(doc: dict, namespace: str, settings: Settings) -> dict:
    p = parse({**doc, "metadata": {**doc["metadata"], "namespace": namespace}})
    plans = resolve(p.spec, namespace, p.metadata.name)
    return stage_job(p.spec, plans, plans[0], namespace, p.metadata.name, settings)


def count_jobs(batch: client.BatchV1Api, namespace: str) -> int:
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
        for ns in ("bench-warmup", "bench-direct", "bench-alone", "bench-floor", "bench-operator"):
            core.create_namespace({"metadata": {"name": ns}})
        docs = [pipeline(f"p{i:04d}") for i in range(n)]
        jobs = [first_job(d, "bench-direct", settings) for d in docs]

        def create_jobs(namespace: str, count: int) -> None:
            for job in jobs[:count]:
                batch.create_namespaced_job(namespace, {**job, "metadata": {**job["metadata"], "namespace": namespace}})

        def create_pipelines(namespace: str, count: int) -> None:
            for d in docs[:count]:
                custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, d)

        # Warm both paths: right after a CRD is installed its first creates are slower (measured:
        # 200 in 2.7 s, the next 200 in 0.84 s).
        create_jobs("bench-warmup", 20)
        create_pipelines("bench-warmup", 20)
        time.sleep(3)
        pids = cp.pids

        # direct: the client creates each pipeline's first Job itself.
        with Phase(pids) as direct:
            create_jobs("bench-direct", n)

        # alone: the same pipelines with no operator running: what admitting them costs.
        with Phase(pids) as alone:
            create_pipelines("bench-alone", n)

        # floor: the client itself makes the writes any operator must make per pipeline: the
        # pipeline, its first Job, and one status write saying where it stands.
        status = {"stage": "distill", "progress": "0/2", "stages": [{"name": "distill", "state": "Pending"}]}
        with Phase(pids) as floor:
            create_pipelines("bench-floor", n)
            create_jobs("bench-floor", n)
            for d in docs:
                custom.patch_namespaced_custom_object_status(
                    api.GROUP, api.VERSION, "bench-floor", api.PLURAL, d["metadata"]["name"], {"status": status}
                )

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
            with Phase({**pids, "operator": op.pid}) as operator:
                create_pipelines("bench-operator", n)
                applied = time.perf_counter() - operator.started
                wait_for(lambda: count_jobs(batch, "bench-operator") >= n, timeout=900, what=f"{n} Jobs")
            rss_mb = peak_rss_mb(op.pid)
        finally:
            op.terminate()
            op.wait(30)
            log.close()
        by_kind = operator_requests(audit_log)
        requests = sum(by_kind.values())
    print(f"{n} pipelines, first-stage Job each, one kube-apiserver, {os.cpu_count()} cores shared by all")
    print(f"direct:   {direct.wall:6.1f}s  client creates {n} Jobs                  CPU {direct.cpu_text()}")
    print(f"alone:    {alone.wall:6.1f}s  client creates {n} pipelines, no operator  CPU {alone.cpu_text()}")
    print(f"floor:    {floor.wall:6.1f}s  client makes the writes any operator must: pipeline, Job, status"
          f"  CPU {floor.cpu_text()}")
    print(f"operator: {operator.wall:6.1f}s  client creates {n} pipelines ({applied:.1f}s), the operator their Jobs"
          f"  CPU {operator.cpu_text()}")
    print(f"ratio operator/direct: {operator.wall / direct.wall:.2f} (target <= 1.5); "
          f"floor/direct: {floor.wall / direct.wall:.2f}; operator/floor: {operator.wall / floor.wall:.2f}")
    print(f"operator CPU: {operator.cpu['operator'] / n * 1000:.1f} ms per pipeline")
    print(f"operator peak RSS: {rss_mb:.0f} MB (target <= 200 MB)")
    print(f"API requests by the operator: {requests} = {requests / n:.1f} per pipeline (watches and kopf's own included)")
    for (verb, resource), count in by_kind.most_common():
        if count >= n / 10:
            print(f"  {verb:>6} {resource:<40} {count / n:.2f} per pipeline")


class Phase:
    """Wall time and per-process CPU seconds of one timed phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {"client": os.getpid(), **pids}

    def __enter__(self) -> "Phase":
        self._cpu = {k: cpu_seconds(pid) for k, pid in self.pids.items()}
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.started
        self.cpu = {k: cpu_seconds(pid) - self._cpu[k] for k, pid in self.pids.items()}

    def cpu_text(self) -> str:
        return " ".join(f"{k} {v:.1f}s" for k, v in self.cpu.items() if k != "kube-controller-manager")


def operator_requests(audit_log: Path) -> "collections.Counter[tuple[str, str]]":
    """The operator's completed requests by verb and resource (with subresource)."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in audit_log.read_text().splitlines():
        event = json.loads(line)
        if event.get("stage") != "ResponseComplete" or event["user"]["username"] != OPERATOR_USER:
            continue
        ref = event.get("objectRef", {})
        resource = ref.get("resource", event["requestURI"]) + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        counts[(event["verb"], resource)] += 1
    return counts


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
