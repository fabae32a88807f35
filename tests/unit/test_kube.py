"""The operator's write door against kmock: what each API answer becomes (retry, reason, hint)."""

from __future__ import annotations

import asyncio

import pytest
from kmocking import JOBS, NAMESPACE, PIPELINES, RefusingEmulator, first_job, kube_for, names_of, pipeline_doc, requests_for

from kondense.errors import ApiRejected, Reason
from kondense.kube import Kube

pytestmark = [pytest.mark.kmock(cls=RefusingEmulator), pytest.mark.asyncio]


def job() -> dict:
    return first_job(pipeline_doc("p1"))


def creates(k8s: RefusingEmulator) -> int:
    return len(requests_for(k8s, "create", "jobs"))


async def test_create_is_idempotent_on_deterministic_names(k8s):
    kube = kube_for(k8s)
    assert await asyncio.to_thread(kube.create, job()) is True
    assert await asyncio.to_thread(kube.create, job()) is False  # 409 AlreadyExists: it is there
    assert creates(k8s) == 2


async def test_busy_api_server_is_retried_until_it_answers(k8s):
    k8s.refuse("create", JOBS, 503, "the server is currently unable to handle the request", times=2)
    assert await asyncio.to_thread(kube_for(k8s).create, job()) is True
    assert creates(k8s) == 3
    assert names_of(k8s, "jobs") == [job()["metadata"]["name"]]


async def test_api_server_that_stays_busy_gives_api_unavailable_with_a_delay(k8s):
    k8s.refuse("create", JOBS, 503, "etcdserver: request timed out")
    with pytest.raises(ApiRejected) as e:
        await asyncio.to_thread(kube_for(k8s, attempts=3).create, job())
    assert e.value.reason == Reason.API_UNAVAILABLE and e.value.retry_after == 0.2
    assert "etcdserver: request timed out" in str(e.value) and "retried automatically" in str(e.value)
    assert creates(k8s) == 3


@pytest.mark.parametrize(
    ("message", "reason", "hint"),
    [
        ('jobs.batch is forbidden: User "system:serviceaccount:kondense-system:kondense" cannot create resource '
         '"jobs" in API group "batch" in the namespace "ml"', Reason.FORBIDDEN, "create on batch/jobs"),
        ('jobs.batch "p1-distill" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1, '
         'used: requests.nvidia.com/gpu=8, limited: requests.nvidia.com/gpu=8', Reason.QUOTA_EXCEEDED, "ResourceQuota"),
    ],
)
async def test_forbidden_is_not_retried_in_place_and_says_what_to_fix(k8s, message, reason, hint):
    k8s.refuse("create", JOBS, 403, message)
    with pytest.raises(ApiRejected) as e:
        await asyncio.to_thread(kube_for(k8s).create, job())
    assert e.value.reason == reason and e.value.retry_after is not None
    assert message in str(e.value) and hint in str(e.value)
    assert creates(k8s) == 1  # waiting a few hundred milliseconds cannot fix RBAC or a quota


async def test_invalid_job_is_permanent(k8s):
    k8s.refuse("create", JOBS, 422, 'Job.batch "p1-distill" is invalid: spec.template.spec.nodeSelector: Invalid value: "a b"')
    with pytest.raises(ApiRejected) as e:
        await asyncio.to_thread(kube_for(k8s).create, job())
    assert e.value.reason == Reason.INVALID_SPEC and e.value.retry_after is None
    assert "nodeSelector: Invalid value" in str(e.value)


async def test_status_of_a_deleted_pipeline_is_not_an_error(k8s):
    await asyncio.to_thread(kube_for(k8s).patch_status, NAMESPACE, "gone", {"stage": "distill"})


async def test_status_write_is_retried_and_lands(k8s):
    await k8s.post(f"/apis/{PIPELINES.rsplit('/', 1)[0]}/namespaces/{NAMESPACE}/compressionpipelines", json=pipeline_doc("p1"))
    k8s.refuse("update", PIPELINES, 500, "internal error", times=2, subresource="status")
    await asyncio.to_thread(kube_for(k8s).patch_status, NAMESPACE, "p1", {"stage": "distill", "progress": "0/2"})
    assert k8s.objects[PIPELINES, NAMESPACE, "p1"]["status"]["progress"] == "0/2"


async def test_unreachable_api_server_gives_api_unavailable():
    from kubernetes import client

    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kube = Kube(client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}")), backoff=0.01)
    with pytest.raises(ApiRejected) as e:
        await asyncio.to_thread(kube.create, job())
    assert e.value.reason == Reason.API_UNAVAILABLE and "Connection refused" in str(e.value)


async def test_a_multi_node_stage_service_is_created_once_and_nothing_else_is_created(k8s):
    from kmocking import JOBS_IMAGE

    from kondense.manifests import stage_objects
    from kondense.plan import resolve
    from kondense.settings import Settings
    from kondense.validation import parse

    doc = pipeline_doc("p1")
    doc["spec"]["stages"][0]["resources"] = {"gpus": 1, "nodes": 2}
    p = parse(doc)
    plans = resolve(p.spec, NAMESPACE, "p1")
    service, _ = stage_objects(p.spec, plans, plans[0], NAMESPACE, "p1", Settings(jobs_image=JOBS_IMAGE))
    kube = kube_for(k8s)
    assert await asyncio.to_thread(kube.create, service) is True
    assert await asyncio.to_thread(kube.create, service) is False  # 409 AlreadyExists: it is there
    assert names_of(k8s, "services") == [service["metadata"]["name"]]
    with pytest.raises(ValueError, match="does not create ConfigMap"):
        await asyncio.to_thread(kube.create, {"kind": "ConfigMap", "metadata": {"namespace": NAMESPACE, "name": "x"}})
