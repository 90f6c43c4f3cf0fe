"""The planner: from a ChatbotTraining and its Jobs and Pods to the next action and the new status.

Pure: nothing here talks to the API server. ``plan()`` is called with fresh lists of the
training's step Jobs and Pods and returns what to do (create the next step's Job, suspend or
resume a Job) and the complete status the training should have afterwards.

Rules:
- Steps run in order; a step's Job is created only after the previous step's Job succeeded.
- Succeeded and Failed are final: no new work is ever created for such a training.
- While spec.suspend is true no Job is created and the running Job is suspended.
- A failed multi-node train Job is made again, up to its backoffLimit + 1 attempts, unless
  retrying cannot help (see multinode.py); the latest attempt is the step's Job.
- A step that fails or waits is explained (see diagnose.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import pydantic

from chatbot_api.spec import NAME_RULE, STEPS, ChatbotTrainingSpec
from chatbot_operator import manifests, multinode
from chatbot_operator.diagnose import diagnose_waiting, needs_events
from chatbot_operator.observe import TERMINAL_PHASES, StepState, get_path
from chatbot_operator.settings import OperatorConfig
from chatbot_operator.status_builder import Reconcile, collect_model, training_status
from chatbot_operator.step_states import from_recorded, observe_step


@dataclasses.dataclass
class Plan:
    """What to do for one training, and the status it should have afterwards."""

    status: dict[str, Any]
    spec: ChatbotTrainingSpec | None = None
    create_step: str | None = None  # create this step's Job (after the PVC and ConfigMap)
    suspend_jobs: dict[str, bool] = dataclasses.field(default_factory=dict)  # Job → suspend
    states: dict[str, StepState] = dataclasses.field(default_factory=dict)
    # The current step's Job has no pod yet: its FailedCreate Events would tell why (when
    # plan() was called without events, read them and plan again).
    events_of_job: Mapping[str, Any] | None = None
    attempt: int = 1  # of the Job to create (a multi-node train Job made again after a failure)
    retry_message: str | None = None  # why that Job is made again


def _owned_by(obj: Mapping[str, Any], uid: str | None) -> bool:
    owners = get_path(obj, "metadata", "ownerReferences", default=[]) or []
    return not owners or not uid or any(o.get("uid") == uid for o in owners)


def _spec_error(error: pydantic.ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item.get("loc", ())) or "spec"
        parts.append(f"{where}: {item.get('msg')}")
    return "; ".join(parts)


def plan(
    training: Mapping[str, Any],
    jobs: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    *,
    now: str,
    config: OperatorConfig,
    events: Iterable[Mapping[str, Any]] | None = None,
) -> Plan:
    """`events`: the training's Jobs' Events (None: not read; see Plan.events_of_job)."""
    meta = training.get("metadata") or {}
    name = meta.get("name", "")
    at = Reconcile(name=name, old=dict(training.get("status") or {}), generation=meta.get("generation"),
                   now=now, progress_seconds=config.progress_seconds)
    pods, jobs = list(pods), list(jobs)
    spec, refused = _valid_spec(training, jobs, at)
    if refused is not None:
        return refused
    step_jobs, foreign = _step_jobs(jobs, name, meta.get("uid"))
    result = _observe(name, spec, step_jobs, pods, at)
    if _finished(result, at):
        return result
    current = next(result.states[s] for s in STEPS if result.states[s].phase != "Succeeded")
    if current.step in foreign and current.job is None:
        return _done(result, at, "Pending", current.step, "WaitingForOldJob",
                     f"Job {manifests.job_name(name, current.step)} belongs to an earlier ChatbotTraining of "
                     f"the same name; waiting for the garbage collector to delete it")
    if spec.suspend:
        if current.job is not None and not current.suspended:
            result.suspend_jobs[current.job_name or ""] = True
        return _done(result, at, "Suspended", current.step, "Suspended",
                     f"Suspended by spec.suspend at step {current.step}; set it to false to resume")
    if current.job is None:
        return _create(result, at, current)
    return _wait(result, at, current, config, events, meta.get("namespace", ""))


def _done(result: Plan, at: Reconcile, phase: str, step: str | None, reason: str, message: str) -> Plan:
    result.status = training_status(at, phase, step, reason, message, result.states, result.spec)
    return result


def _valid_spec(training: Mapping[str, Any], jobs: list, at: Reconcile
                ) -> tuple[ChatbotTrainingSpec | None, Plan | None]:
    """The spec, or the Failed plan of a training whose name or spec the API would refuse."""
    old_steps = at.old.get("steps") or {}
    if not NAME_RULE.holds(at.name) and not old_steps and not jobs:
        # The CRD refuses such names; one created before that rule never gets a Job.
        message = f"The name {at.name!r} is invalid: {NAME_RULE.message} (it has {len(at.name)})"
        return None, _done(Plan(status={}), at, "Failed", None, "InvalidName", message)
    try:
        return ChatbotTrainingSpec.model_validate(training.get("spec") or {}), None
    except pydantic.ValidationError as error:
        message = f"The spec is invalid: {_spec_error(error)}"
        states = {s: from_recorded(s, old_steps[s]) for s in STEPS if s in old_steps}
        status = training_status(at, "Failed", at.old.get("step"), "InvalidSpec", message, states, None)
        return None, Plan(status=status)


def _step_jobs(jobs: list, name: str, uid: str | None) -> tuple[dict[str, Mapping], dict[str, Mapping]]:
    """Each step's latest Job of this training, and those an earlier training of the name left."""
    step_jobs: dict[str, Mapping[str, Any]] = {}
    foreign: dict[str, Mapping[str, Any]] = {}
    for job in jobs:
        step = get_path(job, "metadata", "labels", manifests.LABEL_STEP)
        if step not in STEPS or not multinode.matches_step_job(name, step, job):
            continue
        jobs_of_step = step_jobs if _owned_by(job, uid) else foreign
        if multinode.attempt_of(job) >= multinode.attempt_of(jobs_of_step.get(step)):
            jobs_of_step[step] = job  # the latest attempt
    return step_jobs, foreign


def _observe(name: str, spec: ChatbotTrainingSpec, step_jobs: Mapping[str, Mapping[str, Any]], pods: list,
             at: Reconcile) -> Plan:
    """Every step's state; a failed multi-node train attempt becomes a Job to make again."""
    old_steps = at.old.get("steps") or {}
    states = {step: observe_step(step, step_jobs.get(step), pods, spec, old_steps.get(step)) for step in STEPS}
    multinode.describe(states["train"], spec)
    result = Plan(status={}, spec=spec, states=states)
    retry = multinode.next_attempt(name, spec, states["train"])
    if retry is not None:  # a failed multi-node attempt: the train Job is made again
        train = states["train"]
        states["train"] = StepState(
            step="train", job_name=retry.job_name, attempts=retry.attempt, started=True,
            start_time=train.start_time, world_size=train.world_size, nodes=train.nodes,
            reason="StepRetrying", message=retry.message)
        result.attempt, result.retry_message = retry.attempt, retry.message
    return result


def _finished(result: Plan, at: Reconcile) -> bool:
    """A failed step, every step done, or a phase that is final already: nothing to start."""
    states = result.states
    failed = next((states[s] for s in STEPS if states[s].phase == "Failed"), None)
    if failed is not None:
        _done(result, at, "Failed", failed.step, failed.reason or "StepFailed",
              failed.message or f"Step {failed.step} failed")
        return True
    if all(states[s].phase == "Succeeded" for s in STEPS):
        model = collect_model(states, manifests.workspace_claim_name(at.name, result.spec))
        where = f": {model['path']}" if model else ""
        _done(result, at, "Succeeded", STEPS[-1], "Succeeded", f"Training succeeded; the model is exported{where}")
        return True
    old = at.old
    if old.get("phase") in TERMINAL_PHASES and old.get("reason") != "InvalidSpec":
        _done(result, at, old["phase"], old.get("step"), old.get("reason") or old["phase"], old.get("message") or "")
        return True
    return False


def _create(result: Plan, at: Reconcile, current: StepState) -> Plan:
    """The current step has no Job yet: create it."""
    result.create_step = current.step
    current.job_name = multinode.job_name_for(at.name, result.spec, current.step, result.attempt)
    current.phase = "Pending"
    current.start_time = current.start_time or at.now
    phase = "Running" if any(st.started for st in result.states.values()) else "Pending"
    return _done(result, at, phase, current.step, "StepRetrying" if result.retry_message else "StepStarting",
                 result.retry_message or f"Starting step {current.step} (Job {current.job_name})")


def _wait(result: Plan, at: Reconcile, current: StepState, config: OperatorConfig,
          events: Iterable[Mapping[str, Any]] | None, namespace: str) -> Plan:
    """The current step's Job exists: resume it if the operator suspended it, and say why it waits."""
    if current.suspended and current.suspended_by_operator:
        result.suspend_jobs[current.job_name or ""] = False
    if events is None and needs_events(current):
        result.events_of_job = current.job
    diagnosis = diagnose_waiting(current, result.spec, config, events or (), namespace, at.name)
    phase = "Running" if any(st.started for st in result.states.values()) else "Pending"
    if diagnosis is not None:
        reason, message = diagnosis
    elif current.phase == "Running":
        reason, message = "StepRunning", f"Step {current.step} is running (Job {current.job_name})"
    else:
        reason, message = "StepPending", f"Step {current.step} is waiting to start (Job {current.job_name})"
    return _done(result, at, phase, current.step, reason, message)
