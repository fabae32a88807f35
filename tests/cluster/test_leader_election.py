"""High availability: replicas elect a leader through a coordination.k8s.io/v1 Lease.

First the election itself (kondense.leader, on threads, with short timings) against the real API
server; then two and three `python -m kondense.operator` processes with the chart's environment,
identity and RBAC, a SIGKILLed leader, a SIGTERMed one, and a pipeline that runs across both.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes import client

from controlplane import free_port, wait_for
from operator_harness import (
    RELEASE_NAMESPACE,
    OperatorProcess,
    apply,
    chart_operator_env,
    chart_rbac,
    install_crd,
    operator_service_account,
    wait_for_rbac,
)
# The same namespace, inputs and pipelines as the other operator tests (fixtures included).
from test_operator import STAGES, custom, jobs, pipeline_doc, wait_condition
from test_operator import tiny_inputs, workspace  # noqa: F401

from kondense import api
from kondense.leader import LeaderElector, lease_api, micro_time
from kondense.settings import Election

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


# -- the election, on threads ------------------------------------------------------------------
FAST = {"lease_duration": 4.0, "renew_deadline": 3.0, "retry_period": 0.25}


class Replica:
    """One LeaderElector on a thread of its own, and when it started leading or lost the Lease."""

    def __init__(self, api_client, namespace: str, lease: str, identity: str) -> None:
        self.started: float | None = None
        self.lost: float | None = None
        self.reasons: list[str] = []
        election = Election(lease, namespace, identity, **FAST)
        leases = lease_api(api_client.configuration)  # a client of its own, as in the operator
        self.elector = LeaderElector(leases, election, self._started, self._lost)
        self.thread = threading.Thread(target=self.elector.run, name=identity, daemon=True)
        self.thread.start()

    def _started(self) -> None:
        self.started = time.monotonic()

    def _lost(self, reason: str) -> None:
        self.reasons.append(reason)
        self.lost = time.monotonic()

    def cut_off(self) -> None:
        """As if the network between this replica and the API server failed."""
        configuration = self.elector.leases.api_client.configuration
        configuration.refresh_api_key_hook = None  # it would set the kubeconfig's server again
        configuration.host = f"https://127.0.0.1:{free_port()}"  # where nothing listens

    def stop(self) -> float:
        self.elector.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        return time.monotonic()


def read_lease(api_client, namespace: str, name: str) -> dict:
    return client.CoordinationV1Api(api_client).read_namespaced_lease(name, namespace).to_dict()["spec"]


def test_one_replica_leads_and_a_stopped_leader_hands_over_at_once(api_client, namespace):
    a = Replica(api_client, namespace, "ha", "a")
    wait_for(lambda: a.started, timeout=10, what="a to take the Lease")
    b = Replica(api_client, namespace, "ha", "b")
    watching = time.monotonic()
    wait_for(lambda: b.elector.holder == "a", timeout=10, what="b to see a's Lease")

    # a keeps renewing for longer than a lease duration: b, watching all along, never takes it.
    first_renewal = read_lease(api_client, namespace, "ha")["renew_time"]
    wait_for(lambda: time.monotonic() - watching > 1.5 * FAST["lease_duration"], timeout=30, what="renewals")
    assert b.started is None and a.elector.leading and not b.elector.leading
    held = read_lease(api_client, namespace, "ha")
    assert held["holder_identity"] == "a" and held["renew_time"] > first_renewal

    # A clean stop releases the Lease: b takes it at its next look, not after a lease duration.
    stopped = a.stop()
    wait_for(lambda: b.started, timeout=10, what="b to take the released Lease")
    assert b.started - stopped < 2 * FAST["retry_period"] + 1.0 < FAST["lease_duration"]
    lease = read_lease(api_client, namespace, "ha")
    assert (lease["holder_identity"], lease["lease_transitions"]) == ("b", 1)
    assert a.lost is None and b.lost is None, "a stop is not a loss"
    b.stop()
    assert not read_lease(api_client, namespace, "ha")["holder_identity"]


def test_a_leader_cut_off_from_the_api_server_stops_before_another_takes_over(api_client, namespace):
    a = Replica(api_client, namespace, "ha", "a")
    wait_for(lambda: a.started, timeout=10, what="a to take the Lease")
    b = Replica(api_client, namespace, "ha", "b")
    wait_for(lambda: b.elector.holder == "a", timeout=10, what="b to see a's Lease")

    a.cut_off()
    cut = time.monotonic()
    wait_for(lambda: a.lost and b.started, timeout=20, what="a to give up and b to take over")
    assert a.reasons == [f"the Lease {namespace}/ha was not renewed for 3 s"]
    assert a.lost - cut <= FAST["renew_deadline"] + FAST["retry_period"] + 0.5
    # b waited out the lease duration after a's last renewal; a had stopped a second before.
    assert b.started - a.lost >= FAST["lease_duration"] - FAST["renew_deadline"] - FAST["retry_period"] - 0.2
    b.stop()


def test_a_dead_holders_lease_is_taken_a_lease_duration_after_it_was_first_seen(api_client, namespace):
    """Expiry is judged on the candidate's own clock, from when it first saw the Lease's current
    version: a renewTime from another node's clock, here a year in the past, does not shorten it."""
    long_ago = micro_time(datetime.now(UTC) - timedelta(days=365))
    client.CoordinationV1Api(api_client).create_namespaced_lease(namespace, {
        "metadata": {"name": "ha"},
        "spec": {"holderIdentity": "crashed", "leaseDurationSeconds": 2, "acquireTime": long_ago,
                 "renewTime": long_ago, "leaseTransitions": 7},
    })
    began = time.monotonic()
    b = Replica(api_client, namespace, "ha", "b")
    wait_for(lambda: b.started, timeout=10, what="b to take the dead holder's Lease")
    assert 2 <= b.started - began <= 2 + 2 * FAST["retry_period"] + 1.0
    assert read_lease(api_client, namespace, "ha")["lease_transitions"] == 8
    b.stop()


# -- operator processes ------------------------------------------------------------------------
LEASE = "kondense"  # the release's full name: what the chart's Deployment names the Lease


@pytest.fixture(scope="module")
def operator_token(control_plane, api_client) -> str:
    """CRD and the chart's RBAC installed; a token of the operator's ServiceAccount."""
    install_crd(api_client)
    core = client.CoreV1Api(api_client)
    if RELEASE_NAMESPACE not in {n.metadata.name for n in core.list_namespace().items}:
        core.create_namespace({"metadata": {"name": RELEASE_NAMESPACE}})
    rbac = chart_rbac()
    apply(api_client, rbac)
    user = f"system:serviceaccount:{RELEASE_NAMESPACE}:{operator_service_account(rbac)}"
    wait_for_rbac(api_client, user, RELEASE_NAMESPACE, [("coordination.k8s.io", "leases", "create")])
    wait_for_rbac(api_client, user, "default", [("batch", "jobs", "create"), ("", "events", "create")])
    return control_plane.service_account_token(RELEASE_NAMESPACE, operator_service_account(rbac))


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    """The operator's environment from the chart's Deployment, with its default timings."""
    return chart_operator_env()


def delete_lease(api_client) -> None:
    try:
        client.CoordinationV1Api(api_client).delete_namespaced_lease(LEASE, RELEASE_NAMESPACE)
    except client.ApiException as e:
        if e.status != 404:
            raise


@pytest.fixture
def replicas(api_client, control_plane, operator_token, operator_env, tmp_path):
    """Start operator replicas by name; all stopped at the end, their logs printed on failure.
    Each test starts without a Lease."""
    delete_lease(api_client)
    started: list[OperatorProcess] = []

    def start(name: str) -> OperatorProcess:
        started.append(OperatorProcess.start(control_plane, operator_token, name, operator_env, tmp_path))
        return started[-1]

    yield start
    for replica in started:
        replica.stop()
        print(f"--- {replica.name} (exit {replica.process.returncode}) ---\n{replica.log()[-6000:]}")


def holder(api_client) -> str | None:
    try:
        return read_lease(api_client, RELEASE_NAMESPACE, LEASE)["holder_identity"]
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def lines_before(log: str, marker: str) -> list[str]:
    lines = log.splitlines()
    return lines[: next(i for i, line in enumerate(lines) if marker in line)]


def test_a_standby_takes_over_from_a_killed_leader_and_the_pipeline_completes_without_duplicate_jobs(
    api_client, replicas, operator_env, workspace, s3_bucket, s3_endpoint  # noqa: F811 - a fixture
):
    ns, name = workspace, "failover"
    lease_duration = int(operator_env["KONDENSE_LEASE_DURATION_SECONDS"])
    retry_period = int(operator_env["KONDENSE_RETRY_PERIOD_SECONDS"])
    # After the leader's last renewal a standby waits a lease duration, and sees the renewal and
    # the expiry each up to a retry period late (1.2 with client-go's jitter); 3 s for a loaded machine.
    bound = lease_duration + 2 * 1.2 * retry_period + 3
    a = replicas("op-a")
    wait_for(lambda: holder(api_client) == "op-a" and (a.health() or {}).get("leading"), timeout=90,
             what="op-a to lead", check=a.check_alive)
    b = replicas("op-b")
    standby = wait_for(lambda: (b.health() or {}).get("holder") == "op-a" and b.health(), timeout=60,
                       what="op-b to answer its liveness probe as a standby", check=b.check_alive)
    assert standby == {"leading": False, "lease": f"{RELEASE_NAMESPACE}/{LEASE}", "holder": "op-a"}
    # Both ready (a rolling update waits for the new pod to be ready before stopping the old one);
    # kondense_leader tells them apart on the metrics Service.
    assert a.get("/readyz") == (200, "leading: the operator runs\n")
    assert b.get("/readyz") == (200, f"standby: the Lease {RELEASE_NAMESPACE}/{LEASE} is held by op-a\n")
    assert "\nkondense_leader 1.0\n" in a.get("/metrics")[1] and "\nkondense_leader 0.0\n" in b.get("/metrics")[1]

    # The pipeline starts under op-a; op-a dies (SIGKILL: no cleanup, no release) while its first
    # stage runs.
    custom(api_client).create_namespaced_custom_object(
        api.GROUP, api.VERSION, ns, api.PLURAL, pipeline_doc(name, s3_bucket, s3_endpoint, STAGES[:2]))
    wait_for(lambda: jobs(api_client, ns), timeout=60, what="op-a to create the first Job",
             check=a.check_alive)
    a.process.kill()
    killed = time.monotonic()
    assert a.process.wait(10) == -9
    assert b.health() == standby, "a standby does not notice a death before the Lease expires"

    wait_for(lambda: holder(api_client) == "op-b", timeout=bound + 30, what="op-b to take the Lease",
             interval=0.1, max_interval=0.1, check=b.check_alive)
    took = time.monotonic() - killed
    wait_for(lambda: (b.health() or {}).get("leading"), timeout=30, what="op-b's operator to run",
             interval=0.1, max_interval=0.1, check=b.check_alive)
    running = time.monotonic() - killed
    print(f"takeover after SIGKILL: Lease taken after {took:.1f} s, operator running after {running:.1f} s")
    assert took <= bound, f"op-b took the Lease {took:.1f} s after op-a died"
    # Until it held the Lease, op-b ran no kopf and no handler: it only waited.
    waiting = lines_before(b.log(), "Took the Lease")
    acting = [line for line in waiting if " kopf" in line or "kondense.handlers" in line]
    assert waiting and not acting, waiting

    # op-a's pod restarts as a standby; op-b is stopped as in a rolling update once it has
    # started the next stage: it releases the Lease and op-c takes it at its next look.
    c = replicas("op-c")
    wait_for(lambda: (c.health() or {}).get("holder") == "op-b", timeout=60, what="op-c to stand by",
             check=c.check_alive)
    wait_for(lambda: len(jobs(api_client, ns)) == 2, timeout=300, what="op-b to start the second stage",
             check=b.check_alive)
    b.process.terminate()
    stopped = time.monotonic()
    wait_for(lambda: holder(api_client) == "op-c", timeout=lease_duration + 30, what="op-c to take the Lease",
             interval=0.1, max_interval=0.1, check=c.check_alive)
    handed_over = time.monotonic() - stopped
    print(f"handover after SIGTERM: Lease taken {handed_over:.1f} s after the signal")
    assert b.process.wait(30) == 0
    assert handed_over < lease_duration, "released, not left to expire"

    done = wait_condition(api_client, ns, name, "Ready", timeout=420)
    stages = done["status"]["stages"]
    assert [s["state"] for s in stages] == ["Succeeded", "Succeeded"]
    # One Job per stage, each the one its stage's status names: none was created twice.
    created = sorted((j.metadata.labels["kondense.io/stage"], j.metadata.name) for j in jobs(api_client, ns))
    assert created == sorted((s["name"], s["job"]) for s in stages)
    lease = read_lease(api_client, RELEASE_NAMESPACE, LEASE)
    assert (lease["holder_identity"], lease["lease_transitions"]) == ("op-c", 2)
    assert c.stop() == 0
    assert not holder(api_client), "a leader that stops releases the Lease"


def test_a_leader_that_cannot_renew_exits_nonzero_before_its_lease_expires(
    api_client, replicas, operator_env
):
    """Its Role's binding is deleted: every renewal is refused (403). The leader stops acting by
    exiting 1 once the renew deadline has passed, while its Lease still has time to run."""
    renew_deadline = int(operator_env["KONDENSE_RENEW_DEADLINE_SECONDS"])
    retry_period = int(operator_env["KONDENSE_RETRY_PERIOD_SECONDS"])
    a = replicas("op-a")
    wait_for(lambda: (a.health() or {}).get("leading"), timeout=90, what="op-a to lead", check=a.check_alive)
    rbac = client.RbacAuthorizationV1Api(api_client)
    binding = f"{LEASE}-leader-election"
    rbac.delete_namespaced_role_binding(binding, RELEASE_NAMESPACE)
    revoked = time.monotonic()
    try:
        code = a.process.wait(renew_deadline + retry_period + 30)
        exited, at = time.monotonic() - revoked, datetime.now(UTC)
    finally:  # the rights back, for the tests after this one
        objects = chart_rbac()
        apply(api_client, [o for o in objects if o["metadata"]["name"] == binding])
        user = f"system:serviceaccount:{RELEASE_NAMESPACE}:{operator_service_account(objects)}"
        wait_for_rbac(api_client, user, RELEASE_NAMESPACE, [("coordination.k8s.io", "leases", "create")])
    assert code == 1
    assert exited <= renew_deadline + retry_period + 3, f"op-a exited {exited:.1f} s after it lost its rights"
    lease = read_lease(api_client, RELEASE_NAMESPACE, LEASE)
    assert lease["holder_identity"] == "op-a"
    expires = lease["renew_time"] + timedelta(seconds=lease["lease_duration_seconds"])
    assert at < expires, f"op-a exited at {at}, its Lease ran until {expires}"
    log = a.log()
    assert "403 Forbidden" in log and "needs get, create and update on leases" in log, log[-3000:]
    assert f"Exiting: the Lease {RELEASE_NAMESPACE}/{LEASE} was not renewed for {renew_deadline} s" in log
