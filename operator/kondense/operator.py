"""`python -m kondense.operator`: the operator process (what the chart's Deployment runs).

With leader election (the chart's default) the process first waits for the Lease (kondense.leader)
and runs kopf only while it holds it; until then it answers the liveness probe as a healthy
standby. A replica that cannot renew the Lease exits nonzero at once, so that it never acts
next to the replica that takes over; one that is stopped (SIGTERM) releases the Lease on its way
out, so that a standby takes over within a retry period, e.g. during a rolling update.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator

import aiohttp.web
import kopf

from kondense import handlers  # noqa: F401 - registers the handlers
from kondense import leader, metrics
from kondense.settings import HEALTH_PATH, Settings

log = logging.getLogger("kondense.operator")


def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers.configure(settings)
    asyncio.run(run(settings))


async def run(settings: Settings) -> None:
    """Run the operator; with leader election, only once this replica holds the Lease."""
    if settings.election is None:
        _serve_metrics(settings, None)
        await operate(settings)
        return
    assert handlers.KUBE is not None, "configure() was not called"
    leases = leader.lease_api(handlers.KUBE.api_client.configuration)
    loop = asyncio.get_running_loop()
    elected, stopping = asyncio.Event(), asyncio.Event()
    elector = leader.LeaderElector(
        leases, settings.election, on_started=lambda: loop.call_soon_threadsafe(elected.set), on_lost=_exit
    )
    _serve_metrics(settings, elector)
    thread = threading.Thread(target=_elect, args=(elector,), name="leader-election", daemon=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    thread.start()
    log.info("Waiting for the Lease %s as %s", elector.where, settings.election.identity)
    try:
        async with _standby_health(settings.liveness_host, settings.liveness_port, elector):
            waiters = {asyncio.create_task(elected.wait()), asyncio.create_task(stopping.wait())}
            _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)  # kopf's own handlers stop it gracefully from here on
        if not stopping.is_set():
            await operate(settings)
    finally:
        elector.stop()  # releases the Lease when held
        await asyncio.to_thread(thread.join)


def _serve_metrics(settings: Settings, elector: leader.LeaderElector | None) -> None:
    if settings.metrics_port:
        metrics.serve(settings.liveness_host, settings.metrics_port, lambda: readiness(elector))


def readiness(elector: leader.LeaderElector | None) -> tuple[bool, str]:
    """Ready: this replica can do its part. The leader once kopf has started its handlers; a
    standby while it reaches its Lease (a standby must be ready, or a rolling update with
    maxUnavailable 0 never ends: the new pod leads only after the old one has gone)."""
    if handlers.started():
        return True, "leading: the operator runs"
    if elector is None or elector.leading:
        return False, "starting: kopf has not started the handlers yet"
    ok, why = elector.in_touch
    return ok, f"standby: {why}"


async def operate(settings: Settings) -> None:
    """kopf itself, until SIGTERM/SIGINT."""
    metrics.LEADER.set(1)
    await kopf.operator(
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        standalone=True,  # no kopf peering: leader election decides which replica runs
        liveness_endpoint=settings.liveness_endpoint,
    )


@kopf.on.probe(id="leading")
def leading(**_) -> bool:
    """In kopf's liveness answer: this replica is the active one (a standby answers false)."""
    return True


@contextlib.asynccontextmanager
async def _standby_health(host: str, port: int, elector: leader.LeaderElector) -> AsyncIterator[None]:
    """The liveness endpoint while waiting for the Lease: a standby is healthy, not dead."""

    async def health(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"leading": False, "lease": elector.where, "holder": elector.holder})

    app = aiohttp.web.Application()
    app.router.add_get(HEALTH_PATH, health)
    runner = aiohttp.web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, host, port).start()
    try:
        yield
    finally:
        await runner.cleanup()  # frees the port for kopf's own endpoint


def _elect(elector: leader.LeaderElector) -> None:
    try:
        elector.run()
    except BaseException:  # noqa: BLE001 - a replica that cannot take part in the election stops
        log.exception("Leader election failed")
        _exit("leader election failed")


def _exit(reason: str) -> None:
    """Stop acting at once, in whatever state: the replica that takes over resumes from the
    cluster's state, as after any crash. The pod restarts as a candidate."""
    log.critical("Exiting: %s", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)


if __name__ == "__main__":
    main()
