"""Conditions and the pipeline status derived from stage states."""

from __future__ import annotations

import pytest

from kondense.api import StageStatus
from kondense.status import set_condition, summarize

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def cond(conds, type_):
    return next(c for c in conds if c.type == type_)


def test_last_transition_time_moves_only_when_status_flips():
    c = set_condition([], "Ready", False, "Running", "a", 1, T0)
    c = set_condition(c, "Ready", False, "Running", "b", 2, T1)
    assert cond(c, "Ready").last_transition_time == T0 and cond(c, "Ready").message == "b"
    assert cond(c, "Ready").observed_generation == 2
    c = set_condition(c, "Ready", True, "Succeeded", "", 2, T1)
    assert cond(c, "Ready").last_transition_time == T1 and cond(c, "Ready").status == "True"


def test_set_condition_keeps_other_conditions_in_place():
    c = set_condition([], "Ready", False, "A", "", 1, T0)
    c = set_condition(c, "Failed", False, "A", "", 1, T0)
    c = set_condition(c, "Ready", True, "B", "", 1, T1)
    assert [x.type for x in c] == ["Ready", "Failed"]


def stages(*states):
    return [StageStatus(name=f"s{i}", state=s, reason="R", message="boom" if s == "Failed" else None) for i, s in enumerate(states)]


@pytest.mark.parametrize(
    "states, ready, failed, progressing, stage, progress",
    [
        (("Pending", "Pending"), "False", "False", "True", "s0", "0/2"),
        (("Succeeded", "Running"), "False", "False", "True", "s1", "1/2"),
        (("Succeeded", "Succeeded"), "True", "False", "False", "s1", "2/2"),
        (("Succeeded", "Failed", "Skipped"), "False", "True", "False", "s1", "2/3"),
        (("Running", "Failed"), "False", "True", "True", "s0", "0/2"),
    ],
    ids=["pending", "running", "done", "failed", "failed-while-running"],
)
def test_summarize(states, ready, failed, progressing, stage, progress):
    st = summarize(stages(*states), None, 3, T0)
    assert cond(st.conditions, "Ready").status == ready
    assert cond(st.conditions, "Failed").status == failed
    assert cond(st.conditions, "Progressing").status == progressing
    assert st.stage == stage and st.progress == progress and st.observed_generation == 3
    if failed == "True":
        assert "stage s1: boom" in cond(st.conditions, "Ready").message


def test_quality_gate_condition():
    st = summarize(stages("Succeeded"), None, 1, T0, gate=(False, "gguf: +4.6%"))
    gate = cond(st.conditions, "QualityGatePassed")
    assert gate.status == "False" and gate.reason == "QualityGateFailed" and "gguf" in gate.message
