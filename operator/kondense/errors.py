"""Reasons and exit codes: one table shared by the stages, the local runner and the operator.

A stage process exits with a code that says whether a retry can help. The Job's
podFailurePolicy fails the Job at once on the permanent codes (FailJob) and lets the
backoffLimit retry the others. The same table turns an exit code back into a reason.

| exit | reason                 | retry? | typical cause                                         |
|------|------------------------|--------|-------------------------------------------------------|
| 0    | Succeeded              | -      |                                                       |
| 1    | Error                  | yes    | an unexpected exception (traceback in the pod log)    |
| 10   | InvalidSpec            | no     | the stage document is invalid                         |
| 11   | InvalidInput           | no     | missing/corrupt input artifact, vocab mismatch        |
| 12   | MissingDependency      | no     | the image lacks an optional library                   |
| 13   | QualityGateFailed      | no     | a quality gate of evaluate failed                     |
| 14   | InsufficientResources  | no     | preflight: the models cannot fit the declared GPUs    |
| 15   | StorageAccessDenied    | no     | credentials missing or refused by the store           |
| 20   | StorageUnavailable     | yes    | the store timed out or answered 5xx                   |
| 21   | CUDAOutOfMemory        | yes    | torch.cuda.OutOfMemoryError                           |
| 137  | OOMKilled              | yes    | SIGKILL by the kernel's OOM killer                    |
"""

from __future__ import annotations

from dataclasses import dataclass


class Reason:
    """CamelCase reasons used in conditions, stage status and events."""

    SUCCEEDED = "Succeeded"
    ERROR = "Error"
    INVALID_SPEC = "InvalidSpec"
    INVALID_INPUT = "InvalidInput"
    MISSING_DEPENDENCY = "MissingDependency"
    QUALITY_GATE_FAILED = "QualityGateFailed"
    INSUFFICIENT_RESOURCES = "InsufficientResources"
    STORAGE_ACCESS_DENIED = "StorageAccessDenied"
    STORAGE_UNAVAILABLE = "StorageUnavailable"
    CUDA_OUT_OF_MEMORY = "CUDAOutOfMemory"
    OOM_KILLED = "OOMKilled"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    INTERRUPTED = "Interrupted"
    # A stage whose pod cannot start (Pending with a reason; Failed after resources.pendingTimeoutSeconds).
    UNSCHEDULABLE = "Unschedulable"
    CONFIG_ERROR = "ConfigError"
    POD_CREATE_FAILED = "PodCreateFailed"
    # The API server refused a child the operator wanted to create.
    FORBIDDEN = "Forbidden"
    QUOTA_EXCEEDED = "QuotaExceeded"
    API_UNAVAILABLE = "APIUnavailable"
    NAMESPACE_TERMINATING = "NamespaceTerminating"
    # Progress reasons
    PENDING = "Pending"
    QUEUED = "Queued"
    STARTING = "Starting"
    REPLACING = "Replacing"
    NO_FAILURE = "NoStageFailed"
    RUNNING = "Running"
    WAITING_FOR_INPUTS = "WaitingForInputs"
    UP_TO_DATE = "UpToDate"
    QUALITY_GATE_PASSED = "QualityGatePassed"
    NOT_EVALUATED = "NotEvaluated"


@dataclass(frozen=True)
class Outcome:
    reason: str
    exit_code: int
    retryable: bool
    hint: str


OUTCOMES: tuple[Outcome, ...] = (
    Outcome(Reason.ERROR, 1, True, "see the pod log for the traceback"),
    Outcome(Reason.INVALID_SPEC, 10, False, "fix the stage's fields named in the message"),
    Outcome(Reason.INVALID_INPUT, 11, False, "re-run the producing stage or fix the input URI"),
    Outcome(Reason.MISSING_DEPENDENCY, 12, False, "use the kondense jobs image or pip install 'kondense[jobs]'"),
    Outcome(Reason.QUALITY_GATE_FAILED, 13, False, "relax the gate or change the stage that misses it"),
    Outcome(Reason.INSUFFICIENT_RESOURCES, 14, False, "raise resources.gpus or lower precision/batchSize"),
    Outcome(Reason.STORAGE_ACCESS_DENIED, 15, False, "check spec.storage.credentialsSecret and the bucket policy"),
    Outcome(Reason.STORAGE_UNAVAILABLE, 20, True, "check spec.storage.endpoint; retried automatically"),
    Outcome(Reason.CUDA_OUT_OF_MEMORY, 21, True, "lower batchSize or maxSeqLength, or raise resources.gpus"),
    Outcome(Reason.OOM_KILLED, 137, True, "lower batchSize or raise resources.memory"),
)
BY_REASON = {o.reason: o for o in OUTCOMES}
BY_EXIT_CODE = {o.exit_code: o for o in OUTCOMES}
PERMANENT_EXIT_CODES = sorted(o.exit_code for o in OUTCOMES if not o.retryable)

# Reasons a stage can end with that no exit code carries (the cluster says them).
HINTS = {o.reason: o.hint for o in OUTCOMES} | {
    Reason.DEADLINE_EXCEEDED: "raise resources.activeDeadlineSeconds or lower maxSteps",
    Reason.IMAGE_PULL_FAILED: "check spec.image and the registry's pull secret",
    Reason.UNSCHEDULABLE: "no node can take the pod now: lower resources (gpus, memory), check nodeSelector and "
    "tolerations, or wait for capacity; after resources.pendingTimeoutSeconds the stage fails",
    Reason.CONFIG_ERROR: "a Secret or ConfigMap the pod needs is missing (spec.storage.credentialsSecret?); "
    "create it and the pod starts",
    Reason.POD_CREATE_FAILED: "the Job controller cannot create the pod: check the job ServiceAccount, the "
    "PriorityClass (resources.priorityClassName) and the namespace's Pod Security level",
    Reason.BACKOFF_LIMIT_EXCEEDED: "the stage failed on every retry; see the last pod's log",
    Reason.FORBIDDEN: "grant the operator's ServiceAccount create on batch/jobs in this namespace (chart value rbac)",
    Reason.QUOTA_EXCEEDED: "a ResourceQuota in this namespace is used up; the stage starts when it frees",
    Reason.API_UNAVAILABLE: "the Kubernetes API server did not answer; retried automatically",
}


def outcome_for_exit(code: int) -> Outcome:
    return BY_EXIT_CODE.get(code, BY_EXIT_CODE[1])


class KondenseError(Exception):
    """An error that carries its reason; its message says how to fix it."""

    reason = Reason.ERROR

    @property
    def exit_code(self) -> int:
        return BY_REASON[self.reason].exit_code


class ApiRejected(KondenseError):
    """The API server refused a write: `retry_after` seconds can help, None means it never will."""

    def __init__(self, reason: str, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.reason = reason  # type: ignore[misc]  # per instance: one class for several reasons
        self.retry_after = retry_after


class InvalidSpec(KondenseError):
    reason = Reason.INVALID_SPEC


class InvalidInput(KondenseError):
    reason = Reason.INVALID_INPUT


class MissingDependency(KondenseError):
    reason = Reason.MISSING_DEPENDENCY


class QualityGateFailed(KondenseError):
    reason = Reason.QUALITY_GATE_FAILED


class InsufficientResources(KondenseError):
    reason = Reason.INSUFFICIENT_RESOURCES


class StorageAccessDenied(KondenseError):
    reason = Reason.STORAGE_ACCESS_DENIED


class StorageUnavailable(KondenseError):
    reason = Reason.STORAGE_UNAVAILABLE
