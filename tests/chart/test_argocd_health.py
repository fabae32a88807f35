"""The Argo CD health check (charts/kondense/argocd/health.lua) run in Lua 5.1, as Argo CD runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

try:
    from lupa.lua51 import LuaRuntime
except ImportError:  # a lupa build without the bundled 5.1
    from lupa import LuaRuntime

SCRIPT = (Path(__file__).resolve().parents[2] / "charts" / "kondense" / "argocd" / "health.lua").read_text()


def health(obj: dict[str, Any]) -> dict[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(SCRIPT)
    return {"status": hs["status"], "message": hs["message"]}


def cond(
    type_: str, status: str, reason: str = "", message: str = "", generation: int | None = 2
) -> dict[str, Any]:
    c = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    if generation is not None:
        c["observedGeneration"] = generation
    return c


def pipeline(status: dict[str, Any] | None, generation: int = 2) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kondense.io/v1alpha1",
        "kind": "CompressionPipeline",
        "metadata": {"name": "p", "namespace": "ml", "generation": generation},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status
    return obj


READY = cond("Ready", "True", "Succeeded", "all 5 stages succeeded")
NOT_FAILED = cond("Failed", "False", "Succeeded")
FAILED = cond("Failed", "True", "CUDAOutOfMemory", "stage distill: CUDA out of memory")
RUNNING = cond("Ready", "False", "Running", "running distill")

CASES = [
    pytest.param(pipeline(None), "Progressing", None, id="no-status"),
    pytest.param(pipeline({}), "Progressing", None, id="empty-status"),
    pytest.param(
        pipeline({"observedGeneration": 2, "conditions": []}), "Progressing", None, id="no-conditions"
    ),
    pytest.param(
        pipeline({"observedGeneration": 2, "conditions": [READY, NOT_FAILED]}),
        "Healthy",
        "all 5 stages succeeded",
        id="ready",
    ),
    pytest.param(
        pipeline({"observedGeneration": 2, "conditions": [RUNNING, NOT_FAILED]}),
        "Progressing",
        "running distill",
        id="running",
    ),
    pytest.param(
        pipeline(
            {
                "observedGeneration": 2,
                "progress": "1/5",
                "conditions": [cond("Ready", "False", "Pending", "")],
            }
        ),
        "Progressing",
        "Stages done: 1/5",
        id="pending-without-message",
    ),
    pytest.param(
        pipeline(
            {"observedGeneration": 2, "conditions": [cond("Ready", "False", "CUDAOutOfMemory"), FAILED]}
        ),
        "Degraded",
        "stage distill: CUDA out of memory",
        id="failed",
    ),
    pytest.param(
        pipeline({"observedGeneration": 2, "conditions": [cond("Failed", "True", "InvalidSpec", "")]}),
        "Degraded",
        "InvalidSpec",
        id="failed-without-message",
    ),
    # A spec edited in git: the operator has not seen generation 3 yet, so the old verdicts are stale.
    pytest.param(
        pipeline({"observedGeneration": 2, "conditions": [READY, NOT_FAILED]}, generation=3),
        "Progressing",
        None,
        id="generation-ahead-of-ready",
    ),
    pytest.param(
        pipeline({"observedGeneration": 2, "conditions": [FAILED]}, generation=3),
        "Progressing",
        None,
        id="generation-ahead-of-failed",
    ),
    pytest.param(pipeline({"conditions": [READY]}), "Progressing", None, id="no-observed-generation"),
    # status.observedGeneration caught up but a condition still carries the old generation.
    pytest.param(
        pipeline(
            {"observedGeneration": 3, "conditions": [cond("Ready", "True", generation=2)]}, generation=3
        ),
        "Progressing",
        None,
        id="stale-condition",
    ),
    pytest.param(
        pipeline(
            {
                "observedGeneration": 2,
                "conditions": [cond("Ready", "True", "Succeeded", "done", generation=None)],
            }
        ),
        "Healthy",
        "done",
        id="condition-without-generation",
    ),
]


@pytest.mark.parametrize("obj, status, message", CASES)
def test_health(obj, status, message):
    hs = health(obj)
    assert hs["status"] == status
    if message is not None:
        assert hs["message"] == message
    assert isinstance(hs["message"], str)


def test_failed_wins_over_ready():
    """Ready and Failed both True cannot come from the operator, but a failure must never show Healthy."""
    hs = health(pipeline({"observedGeneration": 2, "conditions": [READY, FAILED]}))
    assert hs["status"] == "Degraded"


@pytest.mark.parametrize(
    "conditions, status, message",
    [
        ([{"type": "Ready", "status": "True", "observedGeneration": 2}], "Healthy", "Ready"),
        ([{"type": "Failed", "status": "True", "observedGeneration": 2}], "Degraded", "Failed"),
        ([{"type": "Ready", "status": "True", "reason": "Succeeded", "observedGeneration": 2}], "Healthy", "Succeeded"),
    ],
    ids=["ready-bare", "failed-bare", "ready-reason-only"],
)
def test_a_condition_without_message_or_reason_still_gets_a_message(conditions, status, message):
    """Lua's ipairs stops at the first nil: first(nil, nil, "Ready") must still reach "Ready"."""
    assert health(pipeline({"observedGeneration": 2, "conditions": conditions})) == {"status": status, "message": message}
