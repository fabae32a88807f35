"""Admission: the real API server refuses, through the generated CRD's schema and CEL rules,
every invalid pipeline that its fields alone decide (tests/invalid_pipelines.py, the corpus that
tests/unit/test_api.py gives `kondense validate` and the planner), naming the field. What needs a
stage's effective resources is admitted, and left to the planner.
"""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from operator_harness import install_crd

from invalid_pipelines import CASES, Case, valid
from kondense import api

pytestmark = [pytest.mark.cluster]


def create(api_client, namespace: str, doc: dict) -> dict:
    return client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, doc, field_validation="Strict"
    )


def refusal(api_client, namespace: str, case: Case) -> str | None:
    """What is wrong with the API server's answer to `case`, or None when it is what it should be."""
    try:
        create(api_client, namespace, case.doc())
    except client.ApiException as e:
        if case.api is None:
            return f"refused, but only the planner can decide it: {e.body}"
        body = json.loads(e.body)
        causes = body.get("details", {}).get("causes", [])
        fields = [("" if c.get("field") == "<nil>" else c.get("field", ""), c.get("message", "")) for c in causes]
        named = [f for f, message in fields if f == case.admission_path and case.api in message]
        if e.status != 422 or not named:
            return f"{e.status}, expected {case.admission_path!r} with {case.api!r}: {causes or body['message']}"
        return None
    if case.api is not None:
        return "admitted"
    return None


def delete(api_client, namespace: str, name: str) -> None:
    client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, name
    )


def test_the_api_server_refuses_what_the_fields_alone_decide(api_client, namespace):
    install_crd(api_client)
    delete(api_client, namespace, create(api_client, namespace, valid())["metadata"]["name"])  # the demo: admitted
    wrong = {}
    for case in CASES:
        if (problem := refusal(api_client, namespace, case)) is not None:
            wrong[case.id] = problem
        if case.api is None and problem is None:  # admitted: out of the way of the next case's name
            delete(api_client, namespace, case.doc()["metadata"]["name"])
    assert not wrong, "\n".join(f"{k}: {v}" for k, v in wrong.items())
