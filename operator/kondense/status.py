"""Pipeline status from stage states: conditions, current stage, progress. Pure functions.

The local runner and the operator derive the whole status from the stages' own facts each
time (Jobs, manifests, summaries) and write it only when it changed.
"""

from __future__ import annotations

from datetime import UTC, datetime

from kondense.api import Condition, PipelineStatus, Report, StageStatus
from kondense.errors import Reason

READY, SUCCEEDED, PROGRESSING, FAILED, GATE = "Ready", "Succeeded", "Progressing", "Failed", "QualityGatePassed"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[Condition],
    type: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[Condition]:
    """A new list with `type` set; lastTransitionTime moves only when status flips."""
    value = {True: "True", False: "False", None: "Unknown"}[status]
    old = next((c for c in conditions if c.type == type), None)
    changed_at = old.last_transition_time if old and old.status == value else now
    new = Condition(
        type=type, status=value, reason=reason, message=message, last_transition_time=changed_at, observed_generation=generation
    )
    return [c for c in conditions if c.type != type] + [new] if old is None else [new if c.type == type else c for c in conditions]


def summarize(
    stages: list[StageStatus],
    previous: PipelineStatus | None,
    generation: int | None,
    now: str,
    report: Report | None = None,
    gate: tuple[bool, str] | None = None,
) -> PipelineStatus:
    """The pipeline's status from its stages' states (spec order)."""
    conds = list(previous.conditions) if previous else []
    total = len(stages)
    done = sum(s.state in ("Succeeded", "Skipped") for s in stages)
    failed = [s for s in stages if s.state == "Failed"]
    running = [s for s in stages if s.state == "Running"]
    pending = [s for s in stages if s.state == "Pending"]

    if failed:
        f = failed[0]
        reason, message = f.reason or Reason.ERROR, f"stage {f.name}: {f.message or f.reason}"
        ready, succeeded, progressing = False, False, bool(running)
        conds = set_condition(conds, FAILED, True, reason, message, generation, now)
    else:
        conds = set_condition(conds, FAILED, False, Reason.NO_FAILURE, "no stage failed", generation, now)
        if done == total:
            reason, message = Reason.SUCCEEDED, f"all {total} stages succeeded"
            ready, succeeded, progressing = True, True, False
        elif running:
            names = ", ".join(f"{s.name} ({s.progress})" if s.progress else s.name for s in running)
            reason, message = Reason.RUNNING, f"running {names}"
            ready, succeeded, progressing = False, False, True
        elif held := [s for s in pending if s.reason not in (None, Reason.PENDING, Reason.WAITING_FOR_INPUTS)]:
            first = held[0]  # what holds the run: Unschedulable, Queued, ConfigError, ...
            reason, message = first.reason or Reason.PENDING, f"stage {first.name} pending: {first.message or first.reason}"
            ready, succeeded, progressing = False, False, True
        else:
            reason, message = Reason.PENDING, f"{len(pending)} stages pending"
            ready, succeeded, progressing = False, False, True

    conds = set_condition(conds, READY, ready, reason, message, generation, now)
    conds = set_condition(conds, SUCCEEDED, succeeded, reason, message, generation, now)
    conds = set_condition(conds, PROGRESSING, progressing, reason, message, generation, now)
    if gate is not None:
        passed, gate_message = gate
        conds = set_condition(
            conds, GATE, passed, Reason.QUALITY_GATE_PASSED if passed else Reason.QUALITY_GATE_FAILED, gate_message, generation, now
        )
    current = (running or failed or pending or stages[-1:])
    return PipelineStatus(
        observed_generation=generation,
        conditions=conds,
        stage=current[0].name if current else None,
        progress=f"{done}/{total}",
        stages=stages,
        report=report if report is not None else (previous.report if previous else None),
    )


def ready_condition(status: PipelineStatus) -> Condition | None:
    return next((c for c in status.conditions if c.type == READY), None)
