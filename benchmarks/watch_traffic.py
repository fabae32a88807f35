"""1000 unrelated pods next to one pipeline: what the operator's Job and pod watches bring in.

Side by side in one run, on one control plane (etcd, kube-apiserver, kube-controller-manager from
tests/cluster): two operator processes (`kondense.operator`, as the chart runs it), each serving a
namespace of its own that holds --pods unrelated pods (Pending: there is no kubelet), --jobs
unrelated suspended Jobs and one pipeline (crds/examples/minimal.yaml; the operator creates its
first Job, the Job controller that Job's pod):
  unfiltered  the Job and pod watches as kopf makes them by itself: every Job and pod of the
              namespace comes over the wire, and kopf drops what the handlers' `labels=` rejects
  filtered    handlers.watch_only_children: the API server applies labelSelector=kondense.io/pipeline
Each operator reaches the API server through a TCP relay of its own that counts the bytes it
receives (TLS records: every response, the watch streams and the answers to its writes alike).
The objects are the events kopf's watch streams yielded, by resource (initial lists included);
CPU is each operator process's user+system time.
  start  from the process's start until it has listed, reconciled the pipeline and gone quiet
  churn  the unrelated pods' and Jobs' labels change --rounds times, until both are quiet again
Prints bytes, objects, CPU and peak RSS per operator and phase, the ratios unfiltered/filtered, and
exits 1 unless the filtered operator received at least 10x fewer bytes.

    python benchmarks/watch_traffic.py [--pods 1000] [--jobs 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("unfiltered", "filtered")
OPERATOR_USER = "kondense-operator"
PIPELINE = "minimal"
TARGET = 10.0  # the filtered operator receives at least this many times fewer bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--as-operator", choices=SIDES, help=argparse.SUPPRESS)  # the operator processes
    ap.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.as_operator:
        run_operator(args.as_operator, args.stats)
    else:
        sys.exit(measure(args.pods, args.jobs, args.rounds))


# -- the operator processes ------------------------------------------------------------------
def run_operator(side: str, stats: Path) -> None:
    """`python -m kondense.operator`, counting the events of kopf's watch streams into `stats`;
    the unfiltered side without watch_only_children, as the operator was before it."""
    from kopf._cogs.clients import watching  # kopf's own stream; the reactor calls it by this name

    from kondense import handlers, operator

    if side == "unfiltered":
        handlers.watch_only_children = lambda settings: None
    counts: collections.Counter[str] = collections.Counter()
    streams = watching.infinite_watch

    async def counted(*, resource, **kwargs):
        async for event in streams(resource=resource, **kwargs):
            if isinstance(event, dict) and event.get("type") != "BOOKMARK":
                counts[resource.plural] += 1
            yield event

    watching.infinite_watch = counted

    def report() -> None:
        while True:
            stats.with_suffix(".tmp").write_text(json.dumps(counts))
            stats.with_suffix(".tmp").replace(stats)
            time.sleep(0.2)

    threading.Thread(target=report, name="stats", daemon=True).start()
    operator.main()


# -- the measurement -------------------------------------------------------------------------
class Relay:
    """A TCP relay to the API server counting the bytes that come back (TLS passes untouched)."""

    def __init__(self, upstream: str) -> None:
        url = urllib.parse.urlsplit(upstream)
        self.upstream = (url.hostname, url.port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.server.getsockname()[1]}"
        self.received = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.server.accept()
            except OSError:  # closed
                return
            far = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(near, far, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(far, near, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if count:
                    with self._lock:
                        self.received += len(data)
        except OSError:
            pass
        finally:
            for sock in (sink, source):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


@dataclass
class Side:
    name: str
    namespace: str
    relay: Relay
    process: subprocess.Popen
    stats: Path

    def snapshot(self) -> dict:
        counts = json.loads(self.stats.read_text()) if self.stats.exists() else {}
        return {"bytes": self.relay.received, "cpu": cpu_seconds(self.process.pid), **counts}

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise SystemExit(f"the {self.name} operator exited with {self.process.returncode}; see its log")


def measure(pods: int, jobs: int, rounds: int) -> int:
    from concurrent.futures import ThreadPoolExecutor

    import yaml
    from kubernetes import client

    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    from controlplane import ControlPlane, wait_for
    from operator_harness import install_crd

    from kondense import api

    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"kondense-watch-{os.getpid()}"
    work.mkdir(parents=True)
    with ControlPlane(users={OPERATOR_USER: ["system:masters"]}) as cp:
        admin = cp.api_client()
        admin.configuration.connection_pool_maxsize = 16
        core, batch = client.CoreV1Api(admin), client.BatchV1Api(admin)
        custom = client.CustomObjectsApi(admin)
        install_crd(admin)
        namespaces = {side: f"bench-{side}" for side in SIDES}
        for ns in namespaces.values():
            core.create_namespace({"metadata": {"name": ns}})
            core.create_namespaced_service_account(ns, {"metadata": {"name": "kondense-job"}})
            account = core.read_namespaced_service_account
            wait_for(lambda ns=ns: account("default", ns), 60, f"the default ServiceAccount of {ns}")

        # The neighbours, in both namespaces: pods and suspended Jobs of some other application.
        items = [(ns, kind, i) for kind, n in (("pod", pods), ("job", jobs)) for i in range(n)
                 for ns in namespaces.values()]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: create_unrelated(core, batch, *item), items))
        doc = yaml.safe_load((ROOT / "crds" / "examples" / "minimal.yaml").read_text())
        for ns in namespaces.values():
            custom.create_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL,
                                                   {**doc, "metadata": {"name": PIPELINE}})

        token = cp.token_for(OPERATOR_USER)
        sides = {side: start_operator(cp, token, side, ns, work) for side, ns in namespaces.items()}
        try:
            for side in sides.values():
                wait_for(lambda side=side: started_job(core, custom, side), 180,
                         f"the {side.name} operator to start the pipeline's Job")
            quiet(sides.values(), expected={"unfiltered": {"pods": pods, "jobs": jobs}})
            started = {name: side.snapshot() for name, side in sides.items()}

            # Churn: every unrelated pod and Job gets a new label value, both namespaces interleaved.
            with ThreadPoolExecutor(8) as pool:
                for round_ in range(rounds):
                    list(pool.map(lambda item: relabel(core, batch, *item, round_), items))
            expected = {"pods": pods * (rounds + 1), "jobs": jobs * (rounds + 1)}
            quiet(sides.values(), expected={"unfiltered": expected})
            churned = {name: side.snapshot() for name, side in sides.items()}
            rss = {name: peak_rss_mb(side.process.pid) for name, side in sides.items()}
        finally:
            for side in sides.values():
                side.process.terminate()
                side.process.wait(30)
                side.relay.close()
    return report(pods, jobs, rounds, started, churned, rss)


def create_unrelated(core, batch, namespace: str, kind: str, i: int) -> None:
    labels = {"app.kubernetes.io/name": "web", "app.kubernetes.io/instance": f"web-{i % 20}"}
    container = {"name": "web", "image": "registry.example/web:1.0", "ports": [{"containerPort": 8080}],
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}
    meta = {"name": f"web-{i:04d}", "labels": labels}
    if kind == "pod":
        core.create_namespaced_pod(namespace, {"metadata": meta, "spec": {"containers": [container]}},
                                   _preload_content=False)
    else:
        pod = {"metadata": {"labels": labels}, "spec": {"containers": [container], "restartPolicy": "Never"}}
        job = {"metadata": meta, "spec": {"suspend": True, "template": pod}}
        batch.create_namespaced_job(namespace, job, _preload_content=False)


def relabel(core, batch, namespace: str, kind: str, i: int, round_: int) -> None:
    patch = {"metadata": {"labels": {"bench.example/round": str(round_)}}}
    if kind == "pod":
        core.patch_namespaced_pod(f"web-{i:04d}", namespace, patch, _preload_content=False)
    else:
        batch.patch_namespaced_job(f"web-{i:04d}", namespace, patch, _preload_content=False)


def start_operator(cp, token: str, side: str, namespace: str, work: Path) -> Side:
    """The operator of `namespace`, reaching the API server through a relay of its own."""
    from controlplane import free_port

    relay = Relay(cp.server)
    kubeconfig = json.loads(Path(cp.kubeconfig_for(token, name=f"operator-{side}")).read_text())
    kubeconfig["clusters"][0]["cluster"]["server"] = relay.url
    (work / f"{side}.kubeconfig").write_text(json.dumps(kubeconfig))
    env = {**os.environ, "KUBECONFIG": str(work / f"{side}.kubeconfig"), "KONDENSE_NAMESPACES": namespace,
           "KONDENSE_JOBS_IMAGE": "kondense-jobs:bench", "KONDENSE_LIVENESS_PORT": str(free_port()),
           "KONDENSE_LOG_LEVEL": "WARNING", "KONDENSE_LEADER_ELECTION": "false"}
    stats = work / f"{side}.json"
    with open(work / f"{side}.log", "w") as log:
        process = subprocess.Popen([sys.executable, __file__, "--as-operator", side, "--stats", str(stats)],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    return Side(side, namespace, relay, process, stats)


def started_job(core, custom, side: Side) -> bool:
    """The operator has written the pipeline's first Job into its status, and the Job its pod."""
    from kondense import api
    from kondense.manifests import LABEL_PIPELINE

    side.check_alive()
    got = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, side.namespace, api.PLURAL, PIPELINE)
    stages = (got.get("status") or {}).get("stages") or []
    pods = core.list_namespaced_pod(side.namespace, label_selector=f"{LABEL_PIPELINE}={PIPELINE}").items
    return bool(stages and stages[0].get("job") and pods)


def quiet(sides, expected: dict[str, dict[str, int]], window: float = 1.5, timeout: float = 300.0) -> None:
    """Wait until each operator has seen what it must (counted events) and then neither received a
    byte nor used more than 30 ms of CPU for `window` seconds."""
    from controlplane import wait_for

    sides = list(sides)

    def settled() -> bool:
        before = {}
        for side in sides:
            side.check_alive()
            now = side.snapshot()
            if any(now.get(k, 0) < v for k, v in expected.get(side.name, {}).items()):
                return False
            before[side.name] = now
        time.sleep(window)
        after = {side.name: side.snapshot() for side in sides}
        return all(after[n]["bytes"] == before[n]["bytes"] and after[n]["cpu"] - before[n]["cpu"] < 0.03
                   for n in before)

    wait_for(settled, timeout, "the operators to go quiet", interval=0.2, max_interval=0.2)


def report(pods: int, jobs: int, rounds: int, started: dict, churned: dict, rss: dict) -> int:
    phases = {
        "start": {s: started[s] for s in SIDES},
        "churn": {s: {k: v - started[s].get(k, 0) for k, v in churned[s].items()} for s in SIDES},
        "total": {s: churned[s] for s in SIDES},
    }
    print(f"{pods} unrelated pods and {jobs} unrelated Jobs per namespace, one pipeline, {rounds} rounds of "
          f"relabelling; one kube-apiserver, {os.cpu_count()} cores shared by all")
    print(f"{'phase':<6} {'operator':<11} {'received':>10} {'pod events':>11} {'Job events':>11} {'CPU':>7}")
    for phase, by_side in phases.items():
        for side in SIDES:
            got = by_side[side]
            print(f"{phase:<6} {side:<11} {got['bytes'] / 1e6:8.2f}MB {got.get('pods', 0):>11} "
                  f"{got.get('jobs', 0):>11} {got['cpu']:6.2f}s")
        u, f = by_side["unfiltered"], by_side["filtered"]
        print(f"{phase:<6} {'ratio':<11} {times(u['bytes'], f['bytes'], 1):>10} "
              f"{times(u.get('pods', 0), f.get('pods', 0), 1):>11} "
              f"{times(u.get('jobs', 0), f.get('jobs', 0), 1):>11} {times(u['cpu'], f['cpu'], 0.01):>7}")
    print(f"peak RSS: unfiltered {rss['unfiltered']:.0f} MB, filtered {rss['filtered']:.0f} MB")
    ratio = churned["unfiltered"]["bytes"] / max(churned["filtered"]["bytes"], 1)
    if ratio < TARGET:
        print(f"FAIL: the filtered operator received only {ratio:.1f}x fewer bytes (target >= {TARGET:g}x)")
        return 1
    print(f"OK: the filtered operator received {ratio:.1f}x fewer bytes (target >= {TARGET:g}x)")
    return 0


def times(unfiltered: float, filtered: float, floor: float) -> str:
    """unfiltered/filtered, the filtered figure at least `floor`: a few bytes are not a divisor."""
    ratio = unfiltered / max(filtered, floor)
    return f"{ratio:.1f}x" if ratio < 10000 else ">10000x"


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
