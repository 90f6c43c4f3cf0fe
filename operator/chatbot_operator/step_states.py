"""A step's state: its Job and Pods observed, a failure explained, what the status recorded.

A step recorded as Succeeded stays so (its summary is kept) even if its Job is gone. A step
fails with the Job's terminal ``Failed`` condition; ``FailureTarget`` comes earlier, before
the Job controller has counted every failed pod, so it only says the step is failing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from chatbot_api.spec import ChatbotTrainingSpec
from chatbot_operator.diagnose import explain_failure
from chatbot_operator.observe import (
    TERMINAL_PHASES,
    StepState,
    counted_failures,
    get_path,
    job_condition,
    pod_started,
    pods_of_job,
    termination_message,
)


def _latest_summary(pods: Sequence[Mapping[str, Any]], ok: bool) -> dict[str, Any] | None:
    for pod in reversed(pods):
        data, _ = termination_message(pod)
        if data is not None and bool(data.get("ok")) == ok:
            return data
    return None


def observe_step(
    step: str,
    job: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    spec: ChatbotTrainingSpec,
    recorded: Mapping[str, Any] | None = None,
) -> StepState:
    """The state of one step from its Job and Pods, and what the status recorded before."""
    recorded = recorded or {}
    if job is None:
        if recorded.get("phase") in TERMINAL_PHASES:
            return from_recorded(step, recorded)
        return StepState(step=step)

    job_pods = pods_of_job(job, pods, step)
    status = job.get("status") or {}
    # The Job controller raises status.failed only after it tracked the pod: count both.
    failures = max(int(status.get("failed") or 0), len(counted_failures(job_pods)))
    finished = int(status.get("succeeded") or 0) + failures
    state = StepState(
        step=step,
        job=job,
        job_name=get_path(job, "metadata", "name"),
        pods=job_pods,
        start_time=status.get("startTime") or get_path(job, "metadata", "creationTimestamp"),
        attempts=max(len(job_pods), finished + (1 if int(status.get("active") or 0) else 0)) or None,
        started=(finished > 0 or int(status.get("ready") or 0) > 0
                 or any(pod_started(pod) for pod in job_pods)),
    )

    complete = job_condition(job, "Complete")
    failed = job_condition(job, "Failed")
    if complete is not None or recorded.get("phase") == "Succeeded":
        state.phase = "Succeeded"
        state.completion_time = (status.get("completionTime") or get_path(complete, "lastTransitionTime")
                                 or recorded.get("completionTime"))
        data = _latest_summary(job_pods, ok=True)
        summary = (data or {}).get("summary")
        state.summary = summary if isinstance(summary, dict) else recorded.get("summary")
        state.started = True
    elif failed is not None:
        state.phase = "Failed"
        state.completion_time = failed.get("lastTransitionTime") or recorded.get("completionTime")
        state.reason, state.message = explain_failure(step, job, job_pods, spec)
        state.started = True
    elif recorded.get("phase") == "Failed":
        return from_recorded(step, recorded, state)
    else:
        state.phase = "Running" if state.started and not state.suspended else "Pending"
    return state


def from_recorded(step: str, recorded: Mapping[str, Any], base: StepState | None = None) -> StepState:
    state = base or StepState(step=step)
    state.phase = recorded.get("phase", state.phase)
    state.job_name = state.job_name or recorded.get("jobName")
    state.start_time = state.start_time or recorded.get("startTime")
    state.completion_time = recorded.get("completionTime")
    state.attempts = state.attempts or recorded.get("attempts")
    state.reason = recorded.get("reason")
    state.message = recorded.get("message")
    state.summary = recorded.get("summary")
    state.started = True
    return state
