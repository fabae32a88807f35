"""500 pipelines applied at once against a real kube-apiserver: the operator against the floor.

Side by side in each run, on one control plane (etcd + kube-apiserver from tests/cluster), after
a warm-up of both paths:
  direct    the client creates the same 500 first-stage Jobs itself, one after another
  alone     the client creates the 500 CompressionPipelines with no operator running
  floor     the client makes, one after another, the writes any operator must make per
            pipeline: the pipeline, its Job and one status write (no operator running)
  operator  the client creates 500 CompressionPipelines, one after another, while the operator
            (`python -m kondense.operator`, a separate process) plans each, creates its Job and
            writes its status; the clock stops when every Job and every first status exists
            (read from the API server's audit log, so that waiting costs the server nothing)
Three runs (fresh namespaces and a fresh operator process each); the verdict is the median of
operator/floor (target <= 1.25): the floor is what any operator would cost on this machine,
so the ratio is the operator's own overhead. Also printed: operator/direct, CPU seconds per
process in each phase, the operator's peak RSS (target <= 200 MB) and its API requests per
pipeline by kind. Everything shares this machine's cores, so the API server's CPU is part of
every figure. Exits 1 when a target is missed.

    python benchmarks/operator_scale.py [--pipelines 500] [--runs 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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


FLOOR_TARGET = 1.25
RSS_TARGET_MB = 200.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipelines", type=int, default=500)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    n = args.pipelines
    settings = Settings(jobs_image="kondense-jobs:bench")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"kondense-scale-{os.getpid()}"
    work.mkdir(parents=True)
    (work / "audit-policy.yaml").write_text(AUDIT_POLICY)
    audit = AuditLog(work / "audit.log")
    cp = ControlPlane(
        users={OPERATOR_USER: ["system:masters"]},
        controllers=("namespace-controller",),  # no Job controller: we measure Job creation, not pods
        apiserver_flags=(f"--audit-policy-file={work / 'audit-policy.yaml'}", f"--audit-log-path={audit.path}",
                         "--max-requests-inflight=800", "--max-mutating-requests-inflight=400"),
    )
    with cp:
        admin = cp.api_client()
        admin.configuration.connection_pool_maxsize = 16
        core, batch, custom = client.CoreV1Api(admin), client.BatchV1Api(admin), client.CustomObjectsApi(admin)
        install_crd(admin)
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
        core.create_namespace({"metadata": {"name": "bench-warmup"}})
        create_jobs("bench-warmup", 20)
        create_pipelines("bench-warmup", 20)
        time.sleep(3)
        runs = [one_run(i, n, cp, core, create_jobs, create_pipelines, custom, docs, audit, work, settings)
                for i in range(args.runs)]

    print(f"{n} pipelines, first-stage Job each, one kube-apiserver, {os.cpu_count()} cores shared by all; "
          f"{len(runs)} runs")
    for i, r in enumerate(runs):
        print(f"run {i + 1}: direct {r.direct.wall:5.1f}s  alone {r.alone.wall:5.1f}s  floor {r.floor.wall:5.1f}s  "
              f"operator {r.operator.wall:5.1f}s  operator/floor {r.ratio:.2f}  operator/direct "
              f"{r.operator.wall / r.direct.wall:.2f}  operator CPU {r.operator.cpu['operator'] / n * 1000:.1f} ms "
              f"per pipeline  peak RSS {r.rss_mb:.0f} MB")
    mid = sorted(runs, key=lambda r: r.ratio)[len(runs) // 2]
    print("median run, CPU seconds by process:")
    print(f"  direct:   client creates {n} Jobs: {mid.direct.cpu_text()}")
    print(f"  alone:    client creates {n} pipelines, no operator: {mid.alone.cpu_text()}")
    print(f"  floor:    client makes the writes any operator must (pipeline, Job, status): {mid.floor.cpu_text()}")
    print(f"  operator: client creates {n} pipelines, the operator their Jobs and status: {mid.operator.cpu_text()}")
    requests = sum(mid.requests.values())
    print(f"API requests by the operator: {requests} = {requests / n:.2f} per pipeline (watches and kopf's own included)")
    for (verb, resource), count in mid.requests.most_common():
        if count >= n / 10:
            print(f"  {verb:>6} {resource:<40} {count / n:.2f} per pipeline")
    ratio, rss = statistics.median(r.ratio for r in runs), max(r.rss_mb for r in runs)
    print(f"median operator/floor: {ratio:.2f} (target <= {FLOOR_TARGET}); "
          f"median operator/direct: {statistics.median(r.operator.wall / r.direct.wall for r in runs):.2f}; "
          f"median floor/direct: {statistics.median(r.floor.wall / r.direct.wall for r in runs):.2f}")
    print(f"operator peak RSS: {rss:.0f} MB (target <= {RSS_TARGET_MB:.0f} MB)")
    missed = [what for what, bad in (("operator/floor", ratio > FLOOR_TARGET), ("peak RSS", rss > RSS_TARGET_MB)) if bad]
    if missed:
        print(f"MISSED: {', '.join(missed)}")
        sys.exit(1)


@dataclass
class Run:
    direct: "Phase"
    alone: "Phase"
    floor: "Phase"
    operator: "Phase"
    rss_mb: float
    requests: "collections.Counter[tuple[str, str]]"

    @property
    def ratio(self) -> float:
        return self.operator.wall / self.floor.wall


def one_run(i, n, cp, core, create_jobs, create_pipelines, custom, docs, audit, work, settings) -> Run:
    namespaces = {phase: f"bench-{phase}-{i}" for phase in ("direct", "alone", "floor", "operator")}
    for ns in namespaces.values():
        core.create_namespace({"metadata": {"name": ns}})
    pids = cp.pids

    # direct: the client creates each pipeline's first Job itself.
    with Phase(pids) as direct:
        create_jobs(namespaces["direct"], n)

    # alone: the same pipelines with no operator running: what admitting them costs.
    with Phase(pids) as alone:
        create_pipelines(namespaces["alone"], n)

    # floor: the client itself makes the writes any operator must make per pipeline: the
    # pipeline, its first Job, and one status write saying where it stands.
    status = {"stage": "distill", "progress": "0/2", "stages": [{"name": "distill", "state": "Pending"}]}
    with Phase(pids) as floor:
        create_pipelines(namespaces["floor"], n)
        create_jobs(namespaces["floor"], n)
        for d in docs:
            custom.patch_namespaced_custom_object_status(
                api.GROUP, api.VERSION, namespaces["floor"], api.PLURAL, d["metadata"]["name"], {"status": status}
            )

    # operator: a separate process, as the chart runs it.
    namespace = namespaces["operator"]
    kubeconfig = cp.kubeconfig_for(cp.token_for(OPERATOR_USER), name=OPERATOR_USER)
    env = {**os.environ, "KUBECONFIG": kubeconfig, "KONDENSE_JOBS_IMAGE": settings.jobs_image,
           "KONDENSE_LIVENESS_PORT": str(free_port()), "KONDENSE_METRICS_PORT": str(free_port()),
           "KONDENSE_LOG_LEVEL": "WARNING", "KONDENSE_NAMESPACES": namespace}
    log = open(work / f"operator-{i}.log", "w")
    mark = audit.size()
    op = subprocess.Popen([sys.executable, "-m", "kondense.operator"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: audit.operator_requests(mark)[("list", "compressionpipelines")], timeout=60,
                 what="the operator to start watching")
        time.sleep(2)  # let kopf finish its initial listings before the clock starts
        mark = audit.size()
        with Phase({**pids, "operator": op.pid}) as operator:
            create_pipelines(namespace, n)
            wait_for(lambda: audit.done(mark, namespace) >= (n, n), timeout=900,
                     what=f"{n} Jobs and {n} status writes", max_interval=0.2)
        rss_mb = peak_rss_mb(op.pid)
        time.sleep(5)  # what the operator still does after the clock stopped counts as requests too
        requests = audit.operator_requests(mark)
    finally:
        op.terminate()
        op.wait(30)
        log.close()
    return Run(direct, alone, floor, operator, rss_mb, requests)


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


class AuditLog:
    """The API server's audit log, read from a byte offset (reading it costs the server nothing)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def events(self, since: int) -> "Iterator[dict]":
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(since)
            for line in f:
                if line.endswith(b"\n"):
                    event = json.loads(line)
                    if event.get("stage") == "ResponseComplete" and event["user"]["username"] == OPERATOR_USER:
                        yield event

    def operator_requests(self, since: int) -> "collections.Counter[tuple[str, str]]":
        """The operator's completed requests by verb and resource (with subresource)."""
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for event in self.events(since):
            ref = event.get("objectRef", {})
            resource = ref.get("resource", event["requestURI"]) + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            counts[(event["verb"], resource)] += 1
        return counts

    def done(self, since: int, namespace: str) -> tuple[int, int]:
        """How many Jobs the operator created in `namespace`, and how many pipelines' status it wrote."""
        jobs, written = 0, set()
        for event in self.events(since):
            ref = event.get("objectRef", {})
            if ref.get("namespace") != namespace or event.get("responseStatus", {}).get("code", 0) >= 300:
                continue
            if event["verb"] == "create" and ref.get("resource") == "jobs":
                jobs += 1  # 201 Created: each Job once (a second create would be a 409)
            elif event["verb"] == "patch" and ref.get("subresource") == "status":
                written.add(ref.get("name"))
        return jobs, len(written)


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
