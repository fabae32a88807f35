"""Fixtures for the operator's fine-grained tests on kmock (see kmocking.py)."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import kopf
import pytest
import pytest_asyncio
from kmock import ResourceInfo
from kmocking import JOBS_IMAGE, PIPELINES, RefusingEmulator, kube_for

from kondense import api, handlers
from kondense.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kopf_login  # noqa: E402


@pytest_asyncio.fixture
async def k8s(kmock: RefusingEmulator) -> RefusingEmulator:
    kmock.resources.load_bundled()
    kmock.resources[PIPELINES] = ResourceInfo(
        kind=api.KIND, singular=api.SINGULAR, namespaced=True, subresources={"status"},
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
    )
    return kmock


@pytest.fixture
def operator_settings() -> Settings:
    return Settings(jobs_image=JOBS_IMAGE, progress_seconds=1)


@pytest_asyncio.fixture
async def operator(k8s: RefusingEmulator, operator_settings: Settings) -> AsyncIterator[RefusingEmulator]:
    """The operator's kopf handlers on a thread with its own loop (as in a pod), talking to kmock.

    kopf cancels the tasks it finds on its loop when it stops; its own loop keeps the test's
    loop (which serves kmock) out of reach.
    """
    for memory in (handlers._WRITTEN, handlers._REQUEUED, handlers._PROGRESS, handlers._GENERATIONS,
                   handlers._RETRY_TOKENS):
        memory.clear()  # a new operator process remembers nothing
    handlers.configure(operator_settings, kube=kube_for(k8s))
    kopf_login.use(str(k8s.url).rstrip("/"))
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(kopf.operator(clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)
            ready.set()

    thread = threading.Thread(target=run, name="kopf", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 30) and not errors, errors
    yield k8s
    stop.set()
    await asyncio.to_thread(thread.join, 30)
    assert not errors, errors
