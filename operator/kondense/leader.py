"""Leader election through a coordination.k8s.io/v1 Lease, the way client-go does it.

Of several replicas, the holder of the Lease runs the operator; the others are candidates that
read the Lease every retry period and take it once it has gone unrenewed for its
leaseDurationSeconds as *they* observed it: on their own monotonic clock, from the moment they
first saw its current resourceVersion, so clock skew between nodes does not matter. Every write
is a compare-and-swap on the resourceVersion: of two candidates, one wins.

The holder renews every retry period. When it has not renewed for the renew deadline (shorter
than the lease duration, counted from the moment its last successful renewal was sent) it must
stop acting at once: `on_lost` is called, and the operator exits nonzero so that its pod
restarts as a candidate. The holder stops at most renew-deadline after its last renewal, a
candidate starts at least lease-duration after it: the difference keeps two leaders apart. A
holder that stops cleanly (SIGTERM, a rolling update) releases the Lease, and a candidate takes
it at its next look.

The Lease is written here, not through kube.Kube: its writes are compare-and-swap, and each must
finish within the renew deadline instead of being retried past it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kondense.settings import Election

log = logging.getLogger("kondense.leader")

API_VERSION = "coordination.k8s.io/v1"
MIN_REQUEST_TIMEOUT = 0.2  # seconds; a request is never sent with less


def lease_api(configuration: client.Configuration) -> client.CoordinationV1Api:
    """A client of the election's own (renewals never queue behind other requests) that never
    retries: a retried request could outlast the renew deadline it was given."""
    configuration = copy.deepcopy(configuration)
    configuration.retries = False
    return client.CoordinationV1Api(client.ApiClient(configuration))


def micro_time(now: datetime) -> str:
    """A Lease's MicroTime: RFC 3339 with microseconds, in UTC."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def claim(spec: dict, identity: str, expired: bool, duration: float, now: datetime) -> dict | None:
    """The Lease spec that makes `identity` its holder, or None while another holder's term runs.

    `spec` is the Lease's current spec ({} when there is no Lease yet); `expired` says whether
    its holder's term has run out as this candidate observed it. Renewing keeps acquireTime and
    leaseTransitions; taking the Lease counts a transition (the first holder's is 0).
    """
    holder = spec.get("holderIdentity") or ""
    stamp = micro_time(now)
    seconds = max(1, math.ceil(duration))
    if holder == identity:
        return {**spec, "leaseDurationSeconds": seconds, "renewTime": stamp}
    if holder and not expired:
        return None
    return {
        "holderIdentity": identity,
        "leaseDurationSeconds": seconds,
        "acquireTime": stamp,
        "renewTime": stamp,
        "leaseTransitions": spec["leaseTransitions"] + 1 if "leaseTransitions" in spec else 0,
    }


def released(spec: dict, now: datetime) -> dict:
    """The spec of a Lease its holder gives up: no holder, so that a candidate takes it at once."""
    return {
        "leaseDurationSeconds": 1,
        "renewTime": micro_time(now),
        "leaseTransitions": spec.get("leaseTransitions", 0),
    }


class LeaderElector:
    """Waits for the Lease, holds it, gives it back: `run()` on a thread of its own, `stop()` from
    anywhere. `on_started` is called once the Lease is taken, `on_lost` when it could not be kept
    (after which `run()` returns; the operator's `on_lost` exits the process instead)."""

    def __init__(
        self,
        leases: client.CoordinationV1Api,
        election: Election,
        on_started: Callable[[], None],
        on_lost: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.leases = leases
        self.election = election
        self.on_started = on_started
        self.on_lost = on_lost
        self.clock = clock
        self.holder = ""  # the holder as last read; "" when none
        self.leading = False
        self._stopping = threading.Event()
        self._lease: dict | None = None  # the Lease as last read or written
        self._seen: tuple[str, float] = ("", 0.0)  # its resourceVersion, and when that was first seen
        self._last_error = ""

    @property
    def where(self) -> str:
        return f"{self.election.namespace}/{self.election.lease}"

    @property
    def in_touch(self) -> tuple[bool, str]:
        """Whether the last look at the Lease succeeded, and what it saw (or the error)."""
        if self._last_error:
            return False, f"cannot reach the Lease {self.where}: {self._last_error}"
        if self._lease is None:
            return False, f"has not read the Lease {self.where} yet"
        return True, f"the Lease {self.where} is held by {self.holder or 'nobody'}"

    def stop(self) -> None:
        """Stop waiting, or stop renewing and release the Lease."""
        self._stopping.set()

    def run(self) -> None:
        e = self.election
        while True:
            sent = self.clock()
            if self._try(until=sent + e.renew_deadline):
                break
            if self._stopping.wait(e.retry_period * random.uniform(1.0, 1.2)):  # jitter, as client-go
                return
        self.leading = True
        log.info("Took the Lease %s as %s", self.where, e.identity)
        self.on_started()
        renewed = sent
        while not self._stopping.wait(e.retry_period):
            sent = self.clock()
            if self._try(until=renewed + e.renew_deadline):
                renewed = sent
                continue
            if self.holder != e.identity:
                reason = f"the Lease {self.where} is held by {self.holder or 'nobody'} now"
            elif self.clock() - renewed >= e.renew_deadline:
                reason = f"the Lease {self.where} was not renewed for {e.renew_deadline:g} s"
            else:
                continue
            self.leading = False
            self.on_lost(reason)
            return
        self._release()

    # -- one attempt -----------------------------------------------------------------------
    def _try(self, until: float) -> bool:
        """Take or renew the Lease once, all requests done by `until`; True when held."""
        e = self.election
        try:
            lease = self._read(until)
            if lease is None:
                spec = claim({}, e.identity, True, e.lease_duration, datetime.now(UTC))
                body = {"apiVersion": API_VERSION, "kind": "Lease",
                        "metadata": {"name": e.lease, "namespace": e.namespace}, "spec": spec}
                self._remember(self._write(self.leases.create_namespaced_lease, body, until))
                return True
            self._remember(lease)
            spec = claim(lease.get("spec") or {}, e.identity, self._expired(lease), e.lease_duration,
                         datetime.now(UTC))
            if spec is None:
                return False
            self._remember(self._write(self._replace, {**lease, "spec": spec}, until))
            return True
        except ApiException as exc:
            if exc.status == 409:  # another replica wrote first; the next read shows whom
                return False
            self._complain(f"{exc.status} {exc.reason}: {_message(exc)}")
            return False
        except urllib3.exceptions.HTTPError as exc:  # unreachable, timed out
            self._complain(str(exc))
            return False

    def _expired(self, lease: dict) -> bool:
        spec = lease.get("spec") or {}
        if not spec.get("holderIdentity"):
            return True
        duration = spec.get("leaseDurationSeconds") or self.election.lease_duration
        return self.clock() >= self._seen[1] + duration

    def _remember(self, lease: dict) -> None:
        self._lease = lease
        version = lease["metadata"]["resourceVersion"]
        if version != self._seen[0]:
            self._seen = (version, self.clock())
        self.holder = (lease.get("spec") or {}).get("holderIdentity") or ""
        self._last_error = ""

    def _complain(self, error: str) -> None:
        if error != self._last_error:  # once per distinct error, not every retry period
            forbidden = error.startswith("403")
            hint = " (the operator's Role needs get, create and update on leases)" if forbidden else ""
            log.warning("Lease %s: %s%s", self.where, error, hint)
        self._last_error = error

    def _release(self) -> None:
        if self._lease is None or self.holder != self.election.identity:
            return
        lease = {**self._lease, "spec": released(self._lease.get("spec") or {}, datetime.now(UTC))}
        try:
            self._write(self._replace, lease, self.clock() + self.election.retry_period)
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            log.warning("Could not release the Lease %s (it expires by itself): %s", self.where, exc)
            return
        self.leading = False
        log.info("Released the Lease %s", self.where)

    # -- requests --------------------------------------------------------------------------
    def _timeout(self, until: float) -> float:
        return max(MIN_REQUEST_TIMEOUT, until - self.clock())

    def _read(self, until: float) -> dict | None:
        e = self.election
        try:
            response = self.leases.read_namespaced_lease(
                e.lease, e.namespace, _request_timeout=self._timeout(until), _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(response.data)

    def _replace(self, namespace: str, body: dict, **kwargs) -> urllib3.HTTPResponse:
        return self.leases.replace_namespaced_lease(self.election.lease, namespace, body, **kwargs)

    def _write(self, call: Callable[..., urllib3.HTTPResponse], body: dict, until: float) -> dict:
        response = call(self.election.namespace, body, _request_timeout=self._timeout(until),
                        _preload_content=False)
        return json.loads(response.data)


def _message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(exc.body or exc.reason)
