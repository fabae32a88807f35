"""A real Kubernetes control plane for tests, in the spirit of controller-runtime's envtest.

``ControlPlane`` runs three real binaries as local processes on loopback ports:

* ``etcd`` (temporary data dir, fsync off: the data is thrown away anyway),
* ``kube-apiserver`` (TLS on 127.0.0.1 with a throwaway CA, static-token authentication,
  RBAC authorization, a generated service-account signing key, the default admission chain),
* ``kube-controller-manager`` with a chosen set of controllers (by default the Job, garbage
  collector, namespace, service-account and TTL-after-finished controllers), each controller
  acting under its own service account, as in a kubeadm cluster.

There is no scheduler and no kubelet: ``fakekubelet.FakeKubelet`` plays the node.

The binaries come from ``KUBEBUILDER_ASSETS`` when that directory holds them, otherwise from
``build-assets.sh`` next to this file, which compiles them once into a cache outside the repo.

Usage::

    with ControlPlane(users={"jane": []}) as cp:
        api = cp.api_client()                       # admin (system:masters)
        jane = cp.api_client(cp.kubeconfig_for(cp.token_for("jane")))
        sa = cp.api_client(cp.kubeconfig_for(cp.service_account_token("kondense-system", "kondense")))

Every client is built from an explicit kubeconfig file, never from ``$KUBECONFIG`` or
``~/.kube/config``, so a test can never touch a real cluster by accident.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the kubernetes client is imported lazily: starting processes needs none of it
    from kubernetes.client import ApiClient

HERE = Path(__file__).resolve().parent
BUILD_ASSETS_SCRIPT = HERE / "build-assets.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")

#: Controllers run by kube-controller-manager (names as accepted by ``--controllers`` since
#: v1.29; the pre-1.29 short names such as ``job`` or ``garbagecollector`` are aliases).
#: ``serviceaccount-controller`` creates each namespace's ``default`` ServiceAccount, without
#: which the ServiceAccount admission plugin rejects pods that do not name one; that plugin also
#: gives every pod the ``kube-api-access-*`` projected volume, which needs the
#: ``kube-root-ca.crt`` ConfigMap that ``root-ca-certificate-publisher-controller`` publishes.
DEFAULT_CONTROLLERS = (
    "job-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "root-ca-certificate-publisher-controller",
    "ttl-after-finished-controller",
)

ADMIN_USER = "kondense-test-admin"
CONTROLLER_MANAGER_USER = "system:kube-controller-manager"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CLUSTER_NAME = "kondense-test"


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started; the message carries the logs' tails."""


@dataclass
class _Component:
    """One running binary: its process (leader of its own process group) and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class _StaticUser:
    name: str
    groups: tuple[str, ...]
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))


def find_assets(build: bool = True) -> Path:
    """Return the directory holding etcd, kube-apiserver and kube-controller-manager.

    ``KUBEBUILDER_ASSETS`` wins when it holds all three; otherwise ``build-assets.sh`` prints
    the cache directory, building the binaries first if needed (slow once, instant after).
    """
    env_dir = os.environ.get("KUBEBUILDER_ASSETS")
    if env_dir and all(os.access(Path(env_dir, b), os.X_OK) for b in BINARIES):
        return Path(env_dir)
    if not build:
        raise ControlPlaneError("control-plane binaries not found; run tests/cluster/build-assets.sh")
    # Go's progress goes to our stderr (visible with pytest -s); the last stdout line is the dir.
    result = subprocess.run(
        ["bash", str(BUILD_ASSETS_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False
    )
    if result.returncode != 0:
        raise ControlPlaneError(f"{BUILD_ASSETS_SCRIPT} failed with exit code {result.returncode}")
    return Path(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the usual, tiny, race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    condition: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.05,
    max_interval: float = 0.5,
    check: Callable[[], None] | None = None,
) -> Any:
    """Poll ``condition`` until it returns a truthy value, with a growing interval.

    ``check`` runs before each attempt and may raise to abort early (e.g. a process died).
    Exceptions raised by ``condition`` count as "not yet"; the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        if check is not None:
            check()
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - polling: any failure means "not ready yet"
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)
        interval = min(interval * 1.5, max_interval)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback, torn down without a trace.

    :param users: extra static-token users, ``{name: [groups...]}``. Their tokens are generated
        here (``token_for(name)``); they have no RBAC rights unless a test grants some. For a
        service-account identity, prefer :meth:`service_account_token`, which needs no restart.
    :param controllers: kube-controller-manager controllers to run.
    :param assets_dir: directory with the binaries; default: :func:`find_assets`.
    :param startup_timeout: seconds allowed for each component to become ready.
    :param workdir: a new directory to keep certificates, etcd data and logs in, for a look
        after the run; by default they go to a temporary directory that is removed on stop.
    :param apiserver_flags, controller_manager_flags: extra ``--flag=value`` arguments.
    :param verbosity: klog ``-v`` level of the Kubernetes components.
    :param audit_policy: an audit.k8s.io/v1 Policy (YAML): the API server then writes the requests
        it selects, one JSON event a line, to ``audit_log``; read them with :meth:`audit_events`.
    """

    def __init__(
        self,
        users: Mapping[str, Sequence[str]] | None = None,
        controllers: Iterable[str] = DEFAULT_CONTROLLERS,
        assets_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 60.0,
        workdir: str | os.PathLike[str] | None = None,
        apiserver_flags: Sequence[str] = (),
        controller_manager_flags: Sequence[str] = (),
        verbosity: int = 1,
        audit_policy: str | None = None,
    ) -> None:
        self.controllers = tuple(controllers)
        self.startup_timeout = startup_timeout
        self.apiserver_flags = tuple(apiserver_flags)
        self.controller_manager_flags = tuple(controller_manager_flags)
        self.verbosity = verbosity
        self.audit_policy = audit_policy
        self.audit_log: Path | None = None
        self._assets_dir = Path(assets_dir) if assets_dir else None
        self._workdir_arg = Path(workdir) if workdir else None

        self._users: dict[str, _StaticUser] = {}
        self._add_user(ADMIN_USER, ["system:masters"])
        # kube-controller-manager authenticates as itself and, with
        # --use-service-account-credentials, mints one service-account token per controller:
        # the bootstrap RBAC policy grants exactly what each controller needs.
        self._add_user(CONTROLLER_MANAGER_USER, [])
        for name, groups in (users or {}).items():
            self._add_user(name, groups)

        self.dir: Path | None = None
        self.server: str = ""
        self.kubeconfig: str = ""
        self.ca_file: str = ""
        self._components: list[_Component] = []
        self._owns_dir = False
        self._admin_client: ApiClient | None = None

    # ----------------------------------------------------------------------------- identities

    def _add_user(self, name: str, groups: Iterable[str]) -> None:
        if name in self._users:
            raise ValueError(f"user {name!r} declared twice")
        self._users[name] = _StaticUser(name, tuple(groups))

    @property
    def admin_token(self) -> str:
        """Bearer token of a ``system:masters`` user (cluster-admin, bypasses RBAC)."""
        return self._users[ADMIN_USER].token

    def token_for(self, user: str) -> str:
        """Bearer token of a static user declared with ``users=`` (or the admin)."""
        return self._users[user].token

    def service_account_token(
        self, namespace: str, name: str, *, create: bool = True, expiration_seconds: int = 3600
    ) -> str:
        """A bound token (TokenRequest API) for ``system:serviceaccount:<namespace>:<name>``.

        With ``create`` the namespace and the ServiceAccount are created when missing. The
        identity starts with the rights RBAC gives every service account (i.e. discovery only).
        """
        from kubernetes import client

        core = client.CoreV1Api(self._admin())
        if create:
            _create_ignore_conflict(lambda: core.create_namespace({"metadata": {"name": namespace}}))
            _create_ignore_conflict(
                lambda: core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
            )
        request = {"spec": {"audiences": [SERVICE_ACCOUNT_ISSUER], "expirationSeconds": expiration_seconds}}
        response = core.create_namespaced_service_account_token(
            name, namespace, request, _preload_content=False
        )
        return json.loads(response.data)["status"]["token"]

    # ---------------------------------------------------------------------------- kubeconfigs

    def kubeconfig_for(self, token: str, name: str | None = None, namespace: str = "default") -> str:
        """Write a kubeconfig that authenticates with ``token``; return its path."""
        if self.dir is None:
            raise ControlPlaneError("control plane is not started")
        name = name or f"user-{secrets.token_hex(4)}"
        path = self.dir / "kubeconfigs" / f"{name}.kubeconfig"
        path.parent.mkdir(exist_ok=True)
        ca_data = base64.b64encode(Path(self.ca_file).read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": CLUSTER_NAME,
                    "cluster": {"server": self.server, "certificate-authority-data": ca_data},
                }
            ],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [
                {
                    "name": f"{name}@{CLUSTER_NAME}",
                    "context": {"cluster": CLUSTER_NAME, "user": name, "namespace": namespace},
                }
            ],
            "current-context": f"{name}@{CLUSTER_NAME}",
        }
        # JSON is YAML: every kubeconfig loader (kubectl, client-go, the Python client) reads it.
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)
        return str(path)

    def api_client(self, kubeconfig: str | os.PathLike[str] | None = None) -> ApiClient:
        """A new ``kubernetes.client.ApiClient`` for ``kubeconfig`` (default: the admin one).

        Built with ``new_client_from_config``: it never reads ``$KUBECONFIG`` and never changes
        the client library's global default configuration. Close it when done (``.close()``).
        """
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def _admin(self) -> ApiClient:
        if self._admin_client is None:
            self._admin_client = self.api_client()
        return self._admin_client

    # ------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        if self._components:
            raise ControlPlaneError("control plane already started")
        assets = self._assets_dir or find_assets()
        if self._workdir_arg:
            self.dir = self._workdir_arg
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="kondense-controlplane-"))
            self._owns_dir = True
        try:
            self._write_credentials()
            self._start_etcd(assets)
            self._start_apiserver(assets)
            self._start_controller_manager(assets)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop all components (newest first) and remove the temporary directory. Idempotent."""
        if self._admin_client is not None:
            self._admin_client.close()
            self._admin_client = None
        for component in reversed(self._components):
            terminate_process_group(component.process)
        self._components.clear()
        if self._owns_dir and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            self._owns_dir = False

    @property
    def pids(self) -> dict[str, int]:
        """Process id of each running component, by binary name (for CPU and memory figures)."""
        return {c.name: c.process.pid for c in self._components}

    def log_paths(self) -> dict[str, Path]:
        """Log file of each running component, by binary name."""
        return {c.name: c.log_path for c in self._components}

    def audit_events(self) -> list[dict[str, Any]]:
        """The audit events written so far (needs ``audit_policy``), but a line still being written."""
        if self.audit_log is None:
            raise ControlPlaneError("the control plane was started without an audit policy")
        if not self.audit_log.exists():
            return []
        text = self.audit_log.read_text()
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]

    # ------------------------------------------------------------------------------ internals

    def _write_credentials(self) -> None:
        """A throwaway CA, the API server's serving certificate, the SA key and the token file."""
        assert self.dir is not None
        pki = self.dir / "pki"
        pki.mkdir()
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        _openssl(
            "req", "-x509", *ec, "-days", "7", "-subj", "/CN=kondense-test-ca",
            "-keyout", str(pki / "ca.key"), "-out", str(pki / "ca.crt"),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        _openssl(
            "req", "-x509", *ec, "-days", "7", "-subj", "/CN=kube-apiserver",
            "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
            "-keyout", str(pki / "apiserver.key"), "-out", str(pki / "apiserver.crt"),
            "-addext", "basicConstraints=critical,CA:FALSE",
            "-addext", "keyUsage=critical,digitalSignature",
            "-addext", "extendedKeyUsage=serverAuth",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc",
        )  # fmt: skip
        # ES256 service-account tokens: the API server signs with the private key and
        # verifies with the public one (it does not read public keys out of a PKCS#8 file).
        _openssl(
            "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-out", str(pki / "sa.key"),
        )  # fmt: skip
        _openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
        self.ca_file = str(pki / "ca.crt")

        # --token-auth-file: token,user,uid,"group1,group2"
        lines = [f'{u.token},{u.name},{u.name},"{",".join(u.groups)}"' for u in self._users.values()]
        tokens = pki / "tokens.csv"
        tokens.write_text("\n".join(lines) + "\n")
        tokens.chmod(0o600)

    def _spawn(self, name: str, argv: Sequence[str]) -> _Component:
        assert self.dir is not None
        log_path = self.dir / f"{name}.log"
        # setpriv --pdeathsig: the kernel kills the component if the test process dies without
        # running its teardown (SIGKILL, OOM, ...). start_new_session makes the component lead
        # its own process group, so teardown can signal the group, and so a Ctrl-C in the
        # terminal reaches pytest only, which then tears down in order.
        prefix = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [*prefix, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
            )
        component = _Component(name, process, log_path)
        self._components.append(component)
        return component

    def _wait_ready(self, component: _Component, condition: Callable[[], Any], what: str) -> Any:
        def check() -> None:
            if not component.alive():
                raise ControlPlaneError(
                    f"{component.name} exited with code {component.process.returncode} "
                    f"while waiting for {what}; last log lines:\n{component.log_tail()}"
                )

        try:
            return wait_for(condition, self.startup_timeout, what, check=check)
        except TimeoutError as exc:
            raise ControlPlaneError(
                f"{exc}; last lines of {component.name}'s log:\n{component.log_tail()}"
            ) from exc

    def _start_listener(
        self, name: str, argv_for_port: Callable[[int], list[str]], ready: Callable[[int], bool], what: str
    ) -> int:
        """Start a component that listens on a free port, and wait until ``ready(port)``.

        Between :func:`free_port` and the component's bind, another process may take the port:
        then the component exits with EADDRINUSE, and it is started again on another port.
        """
        for attempt in range(1, 4):
            port = free_port()
            component = self._spawn(name, argv_for_port(port))
            try:
                self._wait_ready(component, functools.partial(ready, port), what)
                return port
            except ControlPlaneError:
                if attempt == 3 or component.alive() or "address already in use" not in component.log_tail():
                    raise
                self._components.remove(component)
        raise AssertionError("unreachable")

    def _start_etcd(self, assets: Path) -> None:
        assert self.dir is not None

        def argv(port: int) -> list[str]:
            client_url = f"http://127.0.0.1:{port}"
            return [
                str(assets / "etcd"),
                f"--data-dir={self.dir / 'etcd-data'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                # Single member: the peer listener is never dialled, so let the kernel pick the
                # port instead of racing for one (as envtest does).
                "--listen-peer-urls=http://127.0.0.1:0",
                # Test data is disposable: skip fsync, the main cost of etcd on a slow disk.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ]

        def healthy(port: int) -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                return json.load(response).get("health") == "true"

        port = self._start_listener("etcd", argv, healthy, "etcd /health")
        self._etcd_url = f"http://127.0.0.1:{port}"

    def _start_apiserver(self, assets: Path) -> None:
        assert self.dir is not None
        pki = self.dir / "pki"

        audit: list[str] = []
        if self.audit_policy is not None:
            (self.dir / "audit-policy.yaml").write_text(self.audit_policy)
            self.audit_log = self.dir / "audit.log"
            audit = [f"--audit-policy-file={self.dir / 'audit-policy.yaml'}",
                     f"--audit-log-path={self.audit_log}"]

        def argv(port: int) -> list[str]:
            return [
                str(assets / "kube-apiserver"),
                f"--etcd-servers={self._etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                # ClusterIPs are only allocated, never routed: nothing here dials them.
                "--service-cluster-ip-range=10.0.0.0/24",
                # The "kubernetes" Service's endpoints would be 127.0.0.1, which Endpoints
                # validation rejects; nothing in the tests needs them.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                f"-v={self.verbosity}",
                *audit,
                *self.apiserver_flags,
            ]

        context = ssl.create_default_context(cafile=self.ca_file)

        def get(port: int, path: str) -> tuple[int, bytes]:
            request = urllib.request.Request(
                f"https://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {self.admin_token}"}
            )
            try:
                with urllib.request.urlopen(request, context=context, timeout=5) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        # /readyz covers etcd, the RBAC bootstrap policy and the other post-start hooks; the
        # "default" namespace comes right after, from a controller inside the API server.
        port = self._start_listener(
            "kube-apiserver",
            argv,
            lambda port: (
                get(port, "/readyz") == (200, b"ok") and get(port, "/api/v1/namespaces/default")[0] == 200
            ),
            "kube-apiserver /readyz and the default namespace",
        )
        self.server = f"https://127.0.0.1:{port}"
        self.kubeconfig = self.kubeconfig_for(self.admin_token, name="admin")

    def _start_controller_manager(self, assets: Path) -> None:
        if not self.controllers:
            return
        kubeconfig = self.kubeconfig_for(
            self.token_for(CONTROLLER_MANAGER_USER), name="kube-controller-manager", namespace="kube-system"
        )
        kcm = self._spawn(
            "kube-controller-manager",
            [
                str(assets / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--controllers={','.join(self.controllers)}",
                "--use-service-account-credentials=true",
                f"--root-ca-file={self.ca_file}",  # published as ConfigMap kube-root-ca.crt
                "--leader-elect=false",
                "--secure-port=0",  # no health/metrics endpoint: nothing to bind, nothing to race
                f"-v={self.verbosity}",
                *self.controller_manager_flags,
            ],
        )
        if "serviceaccount-controller" in self.controllers:
            # Proof that the controllers run: the "default" ServiceAccount of "default".
            from kubernetes import client

            core = client.CoreV1Api(self._admin())
            self._wait_ready(
                kcm,
                lambda: core.read_namespaced_service_account("default", "default"),
                "kube-controller-manager to create the default ServiceAccount",
            )


def _create_ignore_conflict(create: Callable[[], Any]) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        create()
    except ApiException as exc:
        if exc.status != 409:
            raise


def terminate_process_group(process: subprocess.Popen[bytes], grace: float = 5.0) -> int:
    """Stop ``process`` and everything in the process group it leads; return its exit status.

    SIGTERM goes to the group first; SIGKILL follows after ``grace`` seconds, and in any case
    once the leader has exited, so that no child it left behind survives. The leader is reaped
    only after that last signal: until then its zombie keeps the process-group id from being
    recycled, so a signal can never reach an unrelated group.
    """
    if process.returncode is None:
        killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        interval = 0.01
        while not exited_unreaped(process) and time.monotonic() < deadline:
            time.sleep(interval)
            interval = min(interval * 2, 0.2)
        if process.returncode is None:
            killpg(process.pid, signal.SIGKILL)
    return process.wait()


def exited_unreaped(process: subprocess.Popen[bytes], block: bool = False) -> bool:
    """Whether ``process`` has exited, without reaping it (``waitid`` with ``WNOWAIT``)."""
    if process.returncode is not None:
        return True
    flags = os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG)
    try:
        return os.waitid(os.P_PID, process.pid, flags) is not None
    except ChildProcessError:  # reaped meanwhile by someone else
        return True


def killpg(pgid: int, sig: signal.Signals) -> None:
    """``os.killpg`` that tolerates a group that is already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
