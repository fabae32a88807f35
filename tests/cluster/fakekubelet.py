"""A test helper that plays the node: scheduler and kubelet in one, running containers locally.

The control plane of ``controlplane.ControlPlane`` has no scheduler and no kubelet, so a Pod
created by the Job controller would stay Pending forever. ``FakeKubelet`` watches Pods and, for
each new unscheduled one in its namespaces:

1. binds it to a fake Node (``pods/binding``, as the scheduler does; the Node object is created
   on start, Ready, with some CPU, memory and GPU capacity). A pod whose containers request
   more of an extended resource (``nvidia.com/gpu``) than the node has is not bound: it gets
   ``PodScheduled=False, Unschedulable`` with the scheduler's wording, and stays Pending;
2. resolves what the kubelet would: env (plain values, ``$(VAR)`` expansion, ``valueFrom``
   Secret/ConfigMap keys and common ``fieldRef`` paths, ``envFrom``), and volumes (ConfigMap,
   Secret and projected ConfigMap/Secret sources are written out as files; ``emptyDir`` and
   any other kind become empty directories), each under a per-pod temporary directory;
3. reports the pod Running, then runs the FIRST container's ``command + args`` as a local
   process (``python``/``python3`` become ``sys.executable``) in a temporary working
   directory, with mount paths and the termination-message path rewritten to their local
   copies wherever an argument or env value starts with one (also after ``=``, ``:`` or ``,``);
   A pod in a headless Service's subdomain (``spec.subdomain``, as the pods of an Indexed
   Job have) finds its peers by DNS names, ``<host>.<subdomain>[.<namespace>.svc...]``; DNS
   is emulated by rewriting such names in arguments and env values to ``127.0.0.1``, where
   every pod of this node listens (see :func:`_subdomain_resolver`);
4. when the process exits, reports the container terminated (exit code, reason
   Completed/Error, the termination message as the kubelet computes it) and the pod
   Succeeded or Failed, which is what the Job controller acts on.

``restartPolicy`` OnFailure/Always restart the process in place, as the kubelet does. A pod
deleted while running has its process group sent SIGTERM, then SIGKILL after the grace period;
its final status is reported and its deletion completed, as the kubelet does. The ``behaviour``
hook lets a test decide how a container ends without running it (e.g. an OOM kill).
:meth:`PodRun.kill` kills a running container the way a node can (lost, preempted, out of
memory): SIGKILL to its process group, no grace period; the container reports terminated with
exit code 137 (reason Error) and, under ``restartPolicy: Never``, the pod Failed, which the Job
controller then acts on (a retry within ``backoffLimit``, or its ``podFailurePolicy``).

Not emulated: init containers, probes, resource limits, pod ``activeDeadlineSeconds``, images
(the command must exist locally), ``kubectl logs`` (read :meth:`PodRun.output` instead), DNS
(beyond the rewriting above) and network namespaces: all pods share this machine's ports.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

#: Env var holding the local path of the container's termination-message file.
TERMINATION_LOG_ENV = "KONDENSE_TERMINATION_LOG"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# The kubelet's limits: 4 KiB from the termination-message file; with FallbackToLogsOnError
# and an empty file, the last 80 lines of the log, at most 2 KiB.
MAX_TERMINATION_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048

_PYTHON = re.compile(r"(^|/)python(3(\.\d+)?)?$")
# Kubernetes' $(VAR) expansion: "$$" is an escaped "$", unknown references stay as written.
_EXPANSION = re.compile(r"\$(\$|\(([^)]*)\))")


@dataclass(frozen=True)
class PodOutcome:
    """How the first container ends when the ``behaviour`` hook decides instead of the command.

    ``reason`` defaults to the kubelet's ``Completed`` (exit code 0) or ``Error``; an OOM kill
    is ``PodOutcome(137, "OOMKilled")``. The container stays Running for ``delay`` seconds
    first (a deletion of the pod cuts that short).
    """

    exit_code: int
    reason: str | None = None
    message: str = ""
    delay: float = 0.0


#: ``behaviour(pod) -> PodOutcome | None``; ``pod`` is the Pod as a JSON dict. ``None`` runs the
#: container's command as usual. Called once per container start (restarts included).
Behaviour = Callable[[dict[str, Any]], "PodOutcome | None"]


class _NotReady(Exception):
    """The pod cannot start yet (missing ConfigMap, Secret or key): retried, like the kubelet."""


@dataclass
class _Launch:
    argv: list[str]
    env: dict[str, str]  # the container's own env, after path rewriting
    cwd: Path
    termination_log: Path
    termination_policy: str


@dataclass(eq=False)
class PodRun:
    """What the fake kubelet did with one pod; handy in assertions and when debugging."""

    namespace: str
    name: str
    uid: str
    dir: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # the container's env, as passed
    exit_code: int | None = None
    reason: str | None = None
    message: str = ""
    restarts: int = 0
    #: Set once the pod reached a terminal phase (or was given up on).
    done: threading.Event = field(default_factory=threading.Event)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _deleted: bool = False
    _process: subprocess.Popen[bytes] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def output_path(self) -> Path:
        return self.dir / "output.log"

    def output(self) -> str:
        """Everything the container wrote to stdout and stderr (all attempts)."""
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL the running container's process group now, as a node kills a container (lost
        node, preemption, the kernel's OOM killer): it ends with exit code 137, reason Error, and
        the pod is Failed unless its ``restartPolicy`` restarts it. The pod is not deleted.

        Raises ``RuntimeError`` when no process of this pod is running (not started yet, between
        restarts, or finished): wait for the pod to be Running first.
        """
        with self._lock:  # reaping happens under this lock: the group id cannot be recycled
            process = self._process
            # An exited process that is not reaped yet (WNOWAIT leaves it so) has ended on its own.
            if process is None or process.returncode is not None or os.waitid(
                os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT
            ):
                raise RuntimeError(f"pod {self.namespace}/{self.name} has no running container to kill")
            _killpg(process.pid, signal.SIGKILL)

    def _stop(self, grace: float, deleted: bool) -> None:
        """Stop the container: SIGTERM to its process group now, SIGKILL after ``grace``."""
        with self._lock:
            self._deleted |= deleted
            self._stopping.set()
            process = self._process
            if process is None or process.returncode is not None:
                return
            _killpg(process.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        if grace > 0:
            timer = threading.Timer(grace, self._kill, args=(process,))
            timer.daemon = True
            timer.start()

    def _kill(self, process: subprocess.Popen[bytes]) -> None:
        with self._lock:  # reaping happens under this lock: the group id cannot be recycled
            if process.returncode is None:
                _killpg(process.pid, signal.SIGKILL)


class FakeKubelet:
    """Binds and "runs" the pods of some namespaces (all when ``namespaces`` is None).

    :param api_client: an admin ``ApiClient``; the kubelet uses its own client built from a
        copy of that configuration and closes it on stop.
    :param namespaces: namespaces to serve; ``None`` for the whole cluster. Two kubelets must
        not serve the same namespace (both would try to bind the same pods; one would lose).
    :param node_name: the Node that pods are bound to (created if missing).
    :param extra_env: added to every container's environment, overriding the pod's own env.
    :param behaviour: see :data:`Behaviour`; may also be assigned later (``kubelet.behaviour``).
    :param workdir: where the per-pod directories go; default a temporary directory that is
        removed on stop.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        namespaces: Iterable[str] | None = None,
        *,
        node_name: str = "fake-node",
        extra_env: Mapping[str, str] | None = None,
        behaviour: Behaviour | None = None,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        # Our own client (closed on stop) with room for one connection per watch and per
        # busy pod thread.
        configuration = copy.deepcopy(api_client.configuration)
        configuration.connection_pool_maxsize = 32
        self._client = client.ApiClient(configuration=configuration)
        self.core = client.CoreV1Api(self._client)
        self.namespaces = None if namespaces is None else tuple(namespaces)
        self.node_name = node_name
        self.extra_env = dict(extra_env or {})
        self.behaviour = behaviour
        self._workdir_arg = Path(workdir) if workdir else None
        self.workdir: Path | None = None
        self._runs: dict[str, PodRun] = {}  # by pod UID
        self._runs_lock = threading.Lock()
        self._stopping = threading.Event()
        self._watches: list[tuple[threading.Thread, watch.Watch]] = []
        self._workers: list[threading.Thread] = []

    # ------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeKubelet:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> FakeKubelet:
        if self._workdir_arg:
            self.workdir = self._workdir_arg
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="kondense-fakekubelet-"))
        self._register_node()
        scopes: list[str | None] = list(self.namespaces) if self.namespaces is not None else [None]
        for namespace in scopes:
            # The initial list happens here, so pods that already exist are picked up before
            # start() returns; the watch thread continues from the list's resourceVersion.
            resource_version = self._relist(namespace)
            w = watch.Watch()
            thread = threading.Thread(
                target=self._watch_loop,
                args=(namespace, w, resource_version),
                name=f"fakekubelet-watch-{namespace or 'all'}",
                daemon=True,
            )
            self._watches.append((thread, w))
            thread.start()
        return self

    def stop(self) -> None:
        """Kill every container process, stop watching, remove the temporary directory."""
        self._stopping.set()
        for thread, w in self._watches:
            # Watch.stop() shuts the socket down; repeat in case the watch was just reopening.
            while thread.is_alive():
                w.stop()
                thread.join(0.2)
        self._watches.clear()
        with self._runs_lock:
            runs = list(self._runs.values())
        for run in runs:
            run._stop(grace=0, deleted=False)
        for worker in self._workers:
            worker.join(10)
        self._workers.clear()
        self._client.close()
        if self.workdir is not None and self._workdir_arg is None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------------------- queries

    @property
    def runs(self) -> list[PodRun]:
        """The pods this kubelet took on, in the order it took them."""
        with self._runs_lock:
            return list(self._runs.values())

    def run_for(self, namespace: str, name: str) -> PodRun | None:
        """The most recent run of the pod ``namespace/name``, if this kubelet took it."""
        for run in reversed(self.runs):
            if (run.namespace, run.name) == (namespace, name):
                return run
        return None

    # ------------------------------------------------------------------------------ watching

    CAPACITY = {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "8"}

    def _insufficient(self, pod: dict[str, Any]) -> list[str]:
        """The extended resources (integer counts, like GPUs) the pod asks more of than the node has."""
        short = []
        for name, have in self.CAPACITY.items():
            if "/" not in name:  # cpu and memory are not checked: tests run anything locally
                continue
            wanted = sum(
                int((c.get("resources") or {}).get("requests", {}).get(name, 0)) for c in pod["spec"]["containers"]
            )
            if wanted > int(have):
                short.append(name)
        return short

    def _register_node(self) -> None:
        """Create the Node pods are bound to (Ready, with capacity), unless it exists."""
        resources = self.CAPACITY
        node = client.V1Node(
            metadata=client.V1ObjectMeta(
                name=self.node_name, labels={"kubernetes.io/hostname": self.node_name}
            ),
            status=client.V1NodeStatus(
                capacity=resources,
                allocatable=resources,
                conditions=[
                    client.V1NodeCondition(
                        type="Ready", status="True", reason="KubeletReady", message="fake kubelet"
                    )
                ],
            ),
        )
        try:
            self.core.create_node(node, _preload_content=False)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def _relist(self, namespace: str | None) -> str:
        """List pods, reconcile with what we run, return the list's resourceVersion."""
        if namespace is None:
            response = self.core.list_pod_for_all_namespaces(_preload_content=False)
        else:
            response = self.core.list_namespaced_pod(namespace, _preload_content=False)
        pod_list = json.loads(response.data)
        seen = set()
        for pod in pod_list["items"]:
            seen.add(pod["metadata"]["uid"])
            self._observe("ADDED", pod)
        # Pods deleted while we were not watching.
        for run in self.runs:
            if run.uid not in seen and namespace in (None, run.namespace):
                run._stop(grace=0, deleted=True)
        return pod_list["metadata"]["resourceVersion"]

    def _watch_loop(self, namespace: str | None, w: watch.Watch, resource_version: str) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                kwargs: dict[str, Any] = {
                    "resource_version": resource_version,
                    "allow_watch_bookmarks": True,
                    "timeout_seconds": 300,
                }
                if namespace is None:
                    stream = w.stream(self.core.list_pod_for_all_namespaces, **kwargs)
                else:
                    stream = w.stream(self.core.list_namespaced_pod, namespace, **kwargs)
                for event in stream:
                    if self._stopping.is_set():
                        return
                    if event["type"] != "BOOKMARK":
                        self._observe(event["type"], event["raw_object"])
                # A normal end (server-side timeout): resume where we were.
                resource_version = w.resource_version or resource_version
                backoff = 0.1
            except Exception as exc:  # noqa: BLE001 - keep serving; the next relist heals
                if self._stopping.is_set():
                    return
                if not (isinstance(exc, ApiException) and exc.status == 410):
                    log.warning("pod watch (%s) failed: %r; relisting", namespace or "all", exc)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                try:
                    resource_version = self._relist(namespace)
                except Exception as relist_exc:  # noqa: BLE001
                    log.warning("pod relist (%s) failed: %r", namespace or "all", relist_exc)

    def _observe(self, event_type: str, pod: dict[str, Any]) -> None:
        """React to one pod event. Runs on a watch thread: never blocks."""
        meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
        uid = meta["uid"]
        with self._runs_lock:
            run = self._runs.get(uid)
            if run is None:
                # Ours to take: Pending, not bound elsewhere, not being deleted, not shut down.
                if (
                    event_type == "DELETED"
                    or spec.get("nodeName") not in (None, "", self.node_name)
                    or meta.get("deletionTimestamp")
                    or status.get("phase", "Pending") != "Pending"
                    or self._stopping.is_set()
                ):
                    return
                assert self.workdir is not None
                run_dir = Path(
                    tempfile.mkdtemp(prefix=f"{meta['namespace']}.{meta['name']}.", dir=self.workdir)
                )
                run = PodRun(meta["namespace"], meta["name"], uid, run_dir)
                self._runs[uid] = run
                worker = threading.Thread(
                    target=self._serve_pod, args=(run, pod), name=f"fakekubelet-{meta['name']}", daemon=True
                )
                self._workers.append(worker)
                worker.start()
                return
        if event_type == "DELETED":
            run._stop(grace=0, deleted=True)
        elif meta.get("deletionTimestamp"):
            run._stop(grace=float(meta.get("deletionGracePeriodSeconds") or 0), deleted=True)

    # -------------------------------------------------------------------------- running pods

    def _serve_pod(self, run: PodRun, pod: dict[str, Any]) -> None:
        """The life of one pod, on its own thread: bind, prepare, run (and restart), report."""
        try:
            if not pod["spec"].get("nodeName") and (short := self._insufficient(pod)):
                # kube-scheduler's answer when no node fits; the pod waits until it is deleted.
                message = "0/1 nodes are available: " + ", ".join(f"1 Insufficient {r}" for r in short) + "."
                condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                             "message": message, "lastTransitionTime": _now()}
                self._report(run, pod, {"phase": "Pending", "conditions": [condition]})
                run._stopping.wait()
                return
            if not pod["spec"].get("nodeName") and not self._bind(run):
                return
            launch = self._prepare(run, pod)
            if launch is None:  # deleted (or shut down) before it could start
                if run._deleted and not self._stopping.is_set():
                    self._finish_deletion(run)
                return
            start_time = _now()
            last_state = None
            while True:
                started_at = _now()
                self._report(run, pod, _running_status(pod, start_time, started_at, run.restarts, last_state))
                exit_code, reason, message = self._run_container(run, pod, launch)
                terminated = {
                    "exitCode": exit_code,
                    "reason": reason,
                    "startedAt": started_at,
                    "finishedAt": _now(),
                    "containerID": _container_id(pod, pod["spec"]["containers"][0]),
                }
                if message:
                    terminated["message"] = message
                run.exit_code, run.reason, run.message = exit_code, reason, message
                # Restart in place per restartPolicy, after a (much shortened) crash back-off.
                if not self._restarts(pod, exit_code) or run._stopping.wait(min(0.5 * 2**run.restarts, 10.0)):
                    break
                last_state = terminated
                run.restarts += 1
            self._report(run, pod, _terminated_status(pod, run.restarts, terminated, last_state))
            if run._deleted and not self._stopping.is_set():
                self._finish_deletion(run)
        except Exception:  # noqa: BLE001 - a test double must not die silently
            log.exception("fake kubelet failed serving pod %s/%s", run.namespace, run.name)
        finally:
            run.done.set()

    def _bind(self, run: PodRun) -> bool:
        """Assign the pod to our node through pods/binding, like kube-scheduler."""
        binding = client.V1Binding(
            metadata=client.V1ObjectMeta(name=run.name, uid=run.uid),  # uid: a precondition
            target=client.V1ObjectReference(api_version="v1", kind="Node", name=self.node_name),
        )
        try:
            # Raw response: the server answers a Binding with a Status, which the typed
            # client cannot deserialize.
            self.core.create_namespaced_pod_binding(run.name, run.namespace, binding, _preload_content=False)
            return True
        except ApiException as exc:
            if exc.status in (404, 409):  # deleted meanwhile, or bound by someone else
                log.info("not binding %s/%s: %s", run.namespace, run.name, exc.reason)
                return False
            raise

    def _prepare(self, run: PodRun, pod: dict[str, Any]) -> _Launch | None:
        """Build the launch spec, retrying while a referenced object is missing (as the kubelet
        does, reporting CreateContainerConfigError). None if the pod goes away meanwhile."""
        delay = 0.2
        reported = None
        while True:
            try:
                return self._launch_spec(run, pod)
            except _NotReady as exc:
                if str(exc) != reported:
                    reported = str(exc)
                    self._report(run, pod, _waiting_status(pod, "CreateContainerConfigError", reported))
            if run._stopping.wait(delay):
                return None
            delay = min(delay * 2, 2.0)

    def _run_container(self, run: PodRun, pod: dict[str, Any], launch: _Launch) -> tuple[int, str, str]:
        """Run (or let ``behaviour`` decide) one start of the container; (exit, reason, message)."""
        outcome = self.behaviour(pod) if self.behaviour else None
        if outcome is not None:
            if outcome.delay and run._stopping.wait(outcome.delay):
                return 128 + signal.SIGKILL, "Error", ""  # killed by a deletion
            return outcome.exit_code, outcome.reason or _default_reason(outcome.exit_code), outcome.message
        if not launch.argv:
            return 128, "StartError", "no command: the fake kubelet cannot run an image's entrypoint"
        launch.termination_log.write_bytes(b"")
        with open(run.output_path, "ab") as output:
            try:
                process = subprocess.Popen(
                    _pdeathsig_prefix() + launch.argv,
                    cwd=launch.cwd,
                    env={**os.environ, **launch.env},
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, killed as a whole
                )
            except OSError as exc:
                # What container runtimes report when the entrypoint cannot be executed.
                return 128, "StartError", str(exc)
        with run._lock:
            run._process = process
            stopping = run._stopping.is_set()
        if stopping:  # deleted before the process existed
            run._stop(grace=0, deleted=run._deleted)
        # Wait for the exit without reaping, then kill what the container left behind in its
        # process group, then reap: the group id stays reserved until then.
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        with run._lock:
            _killpg(process.pid, signal.SIGKILL)
            status = process.wait()
            run._process = None
        exit_code = 128 - status if status < 0 else status  # killed by signal N: 128 + N
        return exit_code, _default_reason(exit_code), _termination_message(launch, run, exit_code)

    def _restarts(self, pod: dict[str, Any], exit_code: int) -> bool:
        policy = pod["spec"].get("restartPolicy", "Always")
        return policy == "Always" or (policy == "OnFailure" and exit_code != 0)

    def _report(self, run: PodRun, pod: dict[str, Any], status: dict[str, Any]) -> None:
        """Patch pods/status (strategic merge: conditions merge by type)."""
        if self._stopping.is_set():
            return
        try:
            self.core.patch_namespaced_pod_status(
                run.name,
                run.namespace,
                {"status": status},
                _content_type="application/strategic-merge-patch+json",
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status != 404:  # a pod that is already gone has no status to report
                raise

    def _finish_deletion(self, run: PodRun) -> None:
        """The kubelet's last word on a gracefully deleted pod: delete it for good."""
        try:
            self.core.delete_namespaced_pod(
                run.name,
                run.namespace,
                # In the body, not the query: the API server ignores query options when a
                # body is sent.
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=run.uid)
                ),
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    # ------------------------------------------------------------------ env, volumes, paths

    def _launch_spec(self, run: PodRun, pod: dict[str, Any]) -> _Launch:
        spec = pod["spec"]
        container = spec["containers"][0]
        namespace = pod["metadata"]["namespace"]

        # Container path -> local path, for every mount and the termination-message file.
        paths: dict[str, str] = {}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        materialized: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            name = mount["name"]
            if name not in volumes:
                raise _NotReady(f'volume "{name}" is not defined')
            if name not in materialized:
                materialized[name] = self._materialize(run, pod, volumes[name])
            local = materialized[name] / mount.get("subPath", "")
            if mount.get("subPath") and not local.exists():  # the kubelet makes a missing subPath a folder
                local.mkdir(parents=True)
            paths[mount["mountPath"].rstrip("/")] = str(local)
        container_termination_path = container.get("terminationMessagePath", DEFAULT_TERMINATION_MESSAGE_PATH)
        termination_log = run.dir / "termination-log"
        paths[container_termination_path] = str(termination_log)
        paths_to_local, peers_to_local = _path_rewriter(paths), _subdomain_resolver(pod)

        def rewrite(value: str) -> str:
            return peers_to_local(paths_to_local(value))

        env = self._container_env(pod, container)
        # Without a command the image's entrypoint would run, which we cannot know: argv stays
        # empty and the start fails, unless ``behaviour`` decides the outcome.
        argv = []
        if container.get("command"):
            argv = [rewrite(_expand(arg, env)) for arg in [*container["command"], *container.get("args", [])]]
            if _PYTHON.search(argv[0]):
                argv[0] = sys.executable
        env = {name: rewrite(value) for name, value in env.items()}
        # The pod's host name: spec.hostname when set (an Indexed Job's `<job>-<index>`).
        env.setdefault("HOSTNAME", spec.get("hostname") or pod["metadata"]["name"])
        env[TERMINATION_LOG_ENV] = str(termination_log)
        env.update(self.extra_env)

        cwd = run.dir / "workdir"  # the container's workingDir, whatever it is, lands here
        cwd.mkdir(exist_ok=True)
        run.argv, run.env = argv, env
        return _Launch(
            argv=argv,
            env=env,
            cwd=cwd,
            termination_log=termination_log,
            termination_policy=container.get("terminationMessagePolicy", "File"),
        )

    def _container_env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        """The container's environment as the kubelet computes it (envFrom, then env)."""
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                data = self._config_map(namespace, ref["name"], ref.get("optional", False))
            else:
                ref = source["secretRef"]
                data = self._secret(namespace, ref["name"], ref.get("optional", False))
            for key, value in (data or {}).items():
                env[prefix + key] = value.decode(errors="replace") if isinstance(value, bytes) else value
        for var in container.get("env", []):
            if "valueFrom" in var:
                value = self._env_value_from(pod, var["valueFrom"])
                if value is None:  # optional reference to something missing: no variable
                    continue
            else:
                value = _expand(var.get("value", ""), env)
            env[var["name"]] = value
        return env

    def _env_value_from(self, pod: dict[str, Any], source: dict[str, Any]) -> str | None:
        namespace = pod["metadata"]["namespace"]
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            is_secret = "secretKeyRef" in source
            ref = source["secretKeyRef" if is_secret else "configMapKeyRef"]
            optional = ref.get("optional", False)
            lookup = self._secret if is_secret else self._config_map
            data = lookup(namespace, ref["name"], optional)
            if data is None:
                return None
            if ref["key"] not in data:
                if optional:
                    return None
                kind = "secret" if is_secret else "configmap"
                raise _NotReady(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
            value = data[ref["key"]]
            return value.decode(errors="replace") if isinstance(value, bytes) else value
        if "fieldRef" in source:
            return _field_value(pod, source["fieldRef"]["fieldPath"])
        log.warning("unsupported env valueFrom %s in %s: skipped", source, pod["metadata"]["name"])
        return None

    def _materialize(self, run: PodRun, pod: dict[str, Any], volume: dict[str, Any]) -> Path:
        """Write a volume's files under the pod's directory; return that directory."""
        namespace = pod["metadata"]["namespace"]
        root = run.dir / "volumes" / volume["name"]
        root.mkdir(parents=True, exist_ok=True)
        files: dict[str, bytes] = {}
        if "configMap" in volume:
            files = self._projected_files(namespace, "configMap", volume["configMap"])
        elif "secret" in volume:
            source = {**volume["secret"], "name": volume["secret"].get("secretName", "")}
            files = self._projected_files(namespace, "secret", source)
        elif "downwardAPI" in volume:
            for item in volume["downwardAPI"].get("items", []):
                if "fieldRef" in item:
                    value = _field_value(pod, item["fieldRef"]["fieldPath"])
                    files[item["path"]] = (value or "").encode()
        elif "projected" in volume:
            # Such as kube-api-access-*: its ca.crt comes from ConfigMap kube-root-ca.crt; its
            # serviceAccountToken and downwardAPI sources are left out.
            for source in volume["projected"].get("sources", []):
                for kind in ("configMap", "secret"):
                    if kind in source:
                        files.update(self._projected_files(namespace, kind, source[kind]))
        elif "emptyDir" not in volume:
            kind = next((k for k in volume if k != "name"), "?")
            log.info("volume %r (%s) is an empty directory on the fake node", volume["name"], kind)
        for relative, content in files.items():
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        return root

    def _projected_files(self, namespace: str, kind: str, source: dict[str, Any]) -> dict[str, bytes]:
        """Files of a ConfigMap or Secret volume source: every key, or the listed ``items``."""
        optional = source.get("optional", False)
        lookup = self._secret if kind == "secret" else self._config_map
        data = lookup(namespace, source["name"], optional)
        if data is None:
            return {}
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        files = {}
        for item in items:
            if item["key"] not in data:
                if optional:
                    continue
                raise _NotReady(f"key {item['key']} not found in {kind} {namespace}/{source['name']}")
            value = data[item["key"]]
            files[item["path"]] = value if isinstance(value, bytes) else value.encode()
        return files

    def _config_map(self, namespace: str, name: str, optional: bool) -> dict[str, str | bytes] | None:
        obj = self._read(self.core.read_namespaced_config_map, namespace, name, optional, "configmap")
        if obj is None:
            return None
        binary = {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
        return {**(obj.get("data") or {}), **binary}

    def _secret(self, namespace: str, name: str, optional: bool) -> dict[str, bytes] | None:
        obj = self._read(self.core.read_namespaced_secret, namespace, name, optional, "secret")
        if obj is None:
            return None
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    def _read(
        self, read: Callable[..., Any], namespace: str, name: str, optional: bool, kind: str
    ) -> dict[str, Any] | None:
        try:
            return json.loads(read(name, namespace, _preload_content=False).data)
        except ApiException as exc:
            if exc.status != 404:
                raise
            if optional:
                return None
            raise _NotReady(f'{kind} "{name}" not found') from None


# ---------------------------------------------------------------------------- status payloads


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _container_id(pod: dict[str, Any], container: dict[str, Any]) -> str:
    return f"fakekubelet://{pod['metadata']['uid']}/{container['name']}"


def _conditions(ready: bool, reason: str | None = None) -> list[dict[str, Any]]:
    now = _now()

    def condition(kind: str, status: bool, why: str | None = None) -> dict[str, Any]:
        entry = {"type": kind, "status": "True" if status else "False", "lastTransitionTime": now}
        if why:
            entry["reason"] = why
        return entry

    return [
        condition("PodReadyToStartContainers", True),
        condition("Initialized", True),
        condition("ContainersReady", ready, reason),
        condition("Ready", ready, reason),
    ]


def _container_statuses(
    pod: dict[str, Any], state: dict[str, Any], ready: bool, restarts: int, last_state: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The first container carries the real state; any others (sidecars) mirror it."""
    statuses = []
    for container in pod["spec"]["containers"]:
        status = {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "ready": ready,
            "started": "running" in state,
            "restartCount": restarts,
            # Every state key, null when unset: the pod's previous state must not leak into a
            # merge (two states at once is invalid).
            "state": {"waiting": None, "running": None, "terminated": None, **state},
            "lastState": {"terminated": last_state} if last_state else {},
        }
        if "waiting" not in state:
            status["containerID"] = _container_id(pod, container)
        statuses.append(status)
    return statuses


def _waiting_status(pod: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    return {
        "phase": "Pending",
        "conditions": _conditions(False, "ContainersNotReady"),
        "containerStatuses": _container_statuses(
            pod, {"waiting": {"reason": reason, "message": message}}, False, 0, None
        ),
    }


def _running_status(
    pod: dict[str, Any], start_time: str, started_at: str, restarts: int, last_state: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "phase": "Running",
        "startTime": start_time,
        "conditions": _conditions(True),
        "containerStatuses": _container_statuses(
            pod, {"running": {"startedAt": started_at}}, True, restarts, last_state
        ),
    }


def _terminated_status(
    pod: dict[str, Any], restarts: int, terminated: dict[str, Any], last_state: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "phase": "Succeeded" if terminated["exitCode"] == 0 else "Failed",
        "conditions": _conditions(False, "PodCompleted"),
        "containerStatuses": _container_statuses(
            pod, {"terminated": terminated}, False, restarts, last_state
        ),
    }


def _default_reason(exit_code: int) -> str:
    return "Completed" if exit_code == 0 else "Error"


def _termination_message(launch: _Launch, run: PodRun, exit_code: int) -> str:
    """The kubelet's rule: the file's contents; if empty, on error, and the policy says so,
    the tail of the container's log."""
    try:
        with open(launch.termination_log, "rb") as file:
            message = file.read(MAX_TERMINATION_MESSAGE_BYTES)
    except OSError:
        message = b""
    if not message and exit_code != 0 and launch.termination_policy == "FallbackToLogsOnError":
        lines = run.output().splitlines()[-FALLBACK_LOG_LINES:]
        return "\n".join(lines).encode()[-FALLBACK_LOG_BYTES:].decode(errors="replace")
    return message.decode(errors="replace")


# ----------------------------------------------------------------------------------- helpers


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion against the container's env defined so far."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"
        return env.get(match.group(2), match.group(0))

    return _EXPANSION.sub(substitute, text)


def _path_rewriter(paths: Mapping[str, str]) -> Callable[[str], str]:
    """Rewrite container paths to local ones where a value starts with one, also after a
    ``=`` (``--spec=/etc/x``), ``:`` (``PATH``-like lists) or ``,``; longest path wins."""
    if not paths:
        return lambda value: value
    alternatives = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
    pattern = re.compile(rf"(^|[=:,])({alternatives})(?=[/:,]|$)")
    return lambda value: pattern.sub(lambda m: m.group(1) + paths[m.group(2)], value)


def _subdomain_resolver(pod: dict[str, Any]) -> Callable[[str], str]:
    """Emulated DNS for a pod in a headless Service's subdomain: its peers' names -> 127.0.0.1.

    In a cluster, ``<host>.<subdomain>`` (also ``.<namespace>``, ``.<namespace>.svc`` and
    ``.<namespace>.svc.cluster.local``) resolves to the IP of the pod with that host name
    in that Service, e.g. ``<job>-0.<service>`` to an Indexed Job's pod of index 0. On the fake
    node every pod runs on this machine, so every such name is ``127.0.0.1``: the names are
    rewritten wherever they appear in an argument or env value. A name the program builds at
    run time is not rewritten, and two pods listening on one port collide here, where in a
    cluster each has its own IP.
    """
    subdomain = pod["spec"].get("subdomain")
    if not subdomain:
        return lambda value: value
    host = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
    zone = rf"(?:\.{re.escape(pod['metadata']['namespace'])}(?:\.svc(?:\.cluster\.local)?)?)?"
    pattern = re.compile(rf"(?<![\w.-]){host}\.{re.escape(subdomain)}{zone}(?![\w.-])")
    return lambda value: pattern.sub("127.0.0.1", value)


def _field_value(pod: dict[str, Any], path: str) -> str | None:
    """The downward API's ``fieldRef`` paths that make sense on a fake node."""
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName") or "",
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": "127.0.0.1",
        "status.podIP": "127.0.0.1",
    }
    if path in simple:
        return simple[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    log.warning("unsupported fieldRef %s: skipped", path)
    return None


def _pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL``: the kernel kills the container if the test process dies
    without cleaning up (its serving thread is the parent)."""
    return ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
