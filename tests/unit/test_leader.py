"""Leader election: the Lease spec a replica writes, and the settings that turn it on.

The election itself runs against a real API server in tests/cluster/test_leader_election.py.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kondense.leader import claim, micro_time, released
from kondense.settings import Election, Settings

NOW = datetime(2025, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)
STAMP = "2025-05-01T12:00:00.250000Z"
EARLIER = "2025-05-01T11:00:00.000000Z"
HELD_BY_B = {"holderIdentity": "b", "leaseDurationSeconds": 15, "acquireTime": EARLIER, "renewTime": EARLIER,
             "leaseTransitions": 3}
TAKEN_BY_A = {"holderIdentity": "a", "leaseDurationSeconds": 15, "acquireTime": STAMP, "renewTime": STAMP}


@pytest.mark.parametrize(
    "spec, expired, expected",
    [
        pytest.param({}, True, {**TAKEN_BY_A, "leaseTransitions": 0}, id="no-lease-yet"),
        pytest.param(HELD_BY_B, False, None, id="held-by-another"),
        pytest.param(HELD_BY_B, True, {**TAKEN_BY_A, "leaseTransitions": 4}, id="expired"),
        pytest.param(
            {"leaseDurationSeconds": 1, "renewTime": EARLIER, "leaseTransitions": 4},
            False,
            {**TAKEN_BY_A, "leaseTransitions": 5},
            id="released",
        ),
        pytest.param(
            {**HELD_BY_B, "holderIdentity": "a"},
            False,
            {**HELD_BY_B, "holderIdentity": "a", "renewTime": STAMP},
            id="own",
        ),
    ],
)
def test_claim(spec, expired, expected):
    assert claim(spec, "a", expired, 15, NOW) == expected


def test_claim_writes_whole_seconds_never_less_than_asked():
    assert claim({}, "a", True, 2.5, NOW)["leaseDurationSeconds"] == 3


def test_released_lease_has_no_holder_and_keeps_its_transitions():
    assert released(HELD_BY_B, NOW) == {"leaseDurationSeconds": 1, "renewTime": STAMP, "leaseTransitions": 3}


def test_micro_time_is_utc_with_microseconds():
    assert micro_time(NOW) == STAMP


ELECTION_ENV = {"KONDENSE_LEADER_ELECTION": "true", "POD_NAMESPACE": "kondense-system", "POD_NAME": "op-7f9"}


@pytest.mark.parametrize(
    "env, expected",
    [
        pytest.param({}, None, id="off-by-default"),
        pytest.param({"KONDENSE_LEADER_ELECTION": "false", "POD_NAMESPACE": "ns"}, None, id="off"),
        pytest.param(ELECTION_ENV, Election("kondense", "kondense-system", "op-7f9"), id="on-with-defaults"),
        pytest.param(
            {**ELECTION_ENV, "KONDENSE_LEASE_NAME": "kdz", "KONDENSE_LEASE_DURATION_SECONDS": "30",
             "KONDENSE_RENEW_DEADLINE_SECONDS": "20", "KONDENSE_RETRY_PERIOD_SECONDS": "5"},
            Election("kdz", "kondense-system", "op-7f9", 30, 20, 5),
            id="on-with-timings",
        ),
    ],
)
def test_settings_read_the_election(env, expected):
    assert Settings.from_env(env).election == expected


@pytest.mark.parametrize(
    "env, message",
    [
        pytest.param({"KONDENSE_LEADER_ELECTION": "yes"}, "expected true or false", id="not-a-boolean"),
        pytest.param({"KONDENSE_LEADER_ELECTION": "true"}, "needs POD_NAMESPACE", id="no-namespace"),
        pytest.param(
            {**ELECTION_ENV, "KONDENSE_RENEW_DEADLINE_SECONDS": "15"},
            "leaseDuration > renewDeadline > retryPeriod > 0, got 15 s, 15 s, 2 s",
            id="deadline-not-below-duration",
        ),
        pytest.param(
            {**ELECTION_ENV, "KONDENSE_RETRY_PERIOD_SECONDS": "0", "KONDENSE_RENEW_DEADLINE_SECONDS": "3"},
            "got 15 s, 3 s, 0 s",
            id="no-retry-period",
        ),
    ],
)
def test_settings_refuse_an_election_that_cannot_work(env, message):
    with pytest.raises(SystemExit, match=message):
        Settings.from_env(env)


def test_replicas_without_a_pod_name_still_have_distinct_identities():
    env = {k: v for k, v in ELECTION_ENV.items() if k != "POD_NAME"}
    first, second = Settings.from_env(env).election, Settings.from_env(env).election
    assert first is not None and second is not None and first.identity != second.identity


def test_a_standby_answers_its_liveness_probe_on_the_configured_address():
    import asyncio
    import json
    import socket
    import urllib.request
    from types import SimpleNamespace

    from kondense.operator import _standby_health

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    elector = SimpleNamespace(where="kondense-system/kondense", holder="op-a")

    def get() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return json.loads(response.read())

    async def probe() -> dict:
        async with _standby_health("127.0.0.1", port, elector):
            return await asyncio.to_thread(get)

    assert asyncio.run(probe()) == {"leading": False, "lease": "kondense-system/kondense", "holder": "op-a"}

    async def elsewhere() -> None:  # an address of no interface here (TEST-NET-1): the bind itself fails
        async with _standby_health("192.0.2.1", port, elector):
            pass

    with pytest.raises(OSError):
        asyncio.run(elsewhere())
