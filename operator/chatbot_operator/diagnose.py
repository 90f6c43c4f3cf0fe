"""Why a step failed, or why it waits, explained from the most specific source.

A failure: the trainer's own termination message, then the Pod (OOMKilled, exit codes),
then the Job condition (deadline, retries). A step that waits: its pods refused by admission
(the Job's ``FailedCreate`` Events: quota, missing PriorityClass or ServiceAccount), a claim
that does not exist, scheduling, image pulls, configuration, retries. Each message says what
to change in the spec.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from chatbot_api.spec import ChatbotTrainingSpec
from chatbot_operator import manifests
from chatbot_operator.observe import (
    StepState,
    container_status,
    counted_failures,
    get_path,
    job_condition,
    shorten,
    terminated_state,
    termination_message,
)
from chatbot_operator.settings import OperatorConfig

IMAGE_PULL_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName")


CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError")


# Why a created step's pod cannot be created or started (reasons of Warning events).
POD_CREATE_REASONS = ("QuotaExceeded", "PriorityClassNotFound", "ServiceAccountNotFound",
                      "PodCreateRefused")


CLAIM_REASONS = ("ClaimNotFound", "ClaimNotBound")


WAITING_PROBLEMS = (("Unschedulable",) + IMAGE_PULL_REASONS + CONFIG_REASONS + POD_CREATE_REASONS
                    + CLAIM_REASONS)


def condition_reason(text: str | None, fallback: str = "StepFailed") -> str:
    """A valid metav1.Condition reason (CamelCase letters, digits, underscores)."""
    if not text:
        return fallback
    words = re.split(r"[^A-Za-z0-9_]+", text)
    candidate = "".join(w[:1].upper() + w[1:] for w in words if w)
    if not candidate or not candidate[0].isalpha():
        return fallback
    return candidate[:128]


def _oom_message(step: str, spec: ChatbotTrainingSpec) -> str:
    limit = spec.resources.limits.memory if spec.resources and spec.resources.limits else None
    where = f" (memory limit {limit})" if limit else ""
    return (f"Step {step} was OOMKilled{where}: reduce batchSize (or set microBatchSize) "
            f"or request more memory in spec.resources.limits.memory")


def _exit_code_meaning(code: int | None) -> tuple[str, str]:
    return {
        manifests.EXIT_INVALID_INPUT: ("InvalidInput", "invalid input (data, config or model)"),
        manifests.EXIT_QUALITY_THRESHOLD: ("QualityThresholdNotMet", "quality threshold not met"),
        manifests.EXIT_OUT_OF_MEMORY: (
            "OutOfMemory", "out of memory: reduce batchSize (or set microBatchSize)"),
    }.get(code or 0, ("StepFailed", f"exit code {code}"))


def pod_failure_detail(step: str, pod: Mapping[str, Any], spec: ChatbotTrainingSpec) -> tuple[str, str] | None:
    """(reason, message) from one failed pod, or None when it says nothing useful."""
    data, raw = termination_message(pod)
    if data is not None and not data.get("ok"):
        reason = condition_reason(data.get("reason"))
        return reason, shorten(data.get("message") or reason)
    terminated = terminated_state(pod) or {}
    if terminated.get("reason") == "OOMKilled":
        return "OOMKilled", _oom_message(step, spec)
    code = terminated.get("exitCode")
    if code:
        reason, meaning = _exit_code_meaning(code)
        tail = f"; last output: {shorten(raw, 300)}" if raw else ""
        return reason, f"Step {step} exited with {meaning}{tail}"
    return None


def explain_failure(
    step: str,
    job: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    spec: ChatbotTrainingSpec,
) -> tuple[str, str]:
    """(reason, message with advice) for a failed step Job."""
    failed_pods = [p for p in pods if terminated_state(p) is not None and
                   (terminated_state(p) or {}).get("exitCode", 0) != 0]
    # 1. The trainer's own verdict (QualityThresholdNotMet, InvalidData, OutOfMemory, ...).
    for pod in reversed(failed_pods or list(pods)):
        data, _ = termination_message(pod)
        if data is not None and not data.get("ok"):
            reason = condition_reason(data.get("reason"))
            return reason, shorten(f"Step {step} failed: {data.get('message') or reason}")
    # 2. The kernel's: the container ran out of its memory limit.
    for pod in reversed(failed_pods):
        if (terminated_state(pod) or {}).get("reason") == "OOMKilled":
            return "OOMKilled", _oom_message(step, spec)
    # 3. The Job's condition.
    condition = job_condition(job, "Failed", "FailureTarget") or {}
    job_reason = condition.get("reason") or "StepFailed"
    last = pod_failure_detail(step, failed_pods[-1], spec) if failed_pods else None
    detail = f": {last[1]}" if last else ""
    if job_reason == "DeadlineExceeded":
        deadline, _ = manifests.step_policy(spec, step)
        return "DeadlineExceeded", (
            f"Step {step} ran longer than its deadline of {deadline}s and was stopped: "
            f"raise spec.steps.{step}.activeDeadlineSeconds or make the step faster")
    if job_reason == "BackoffLimitExceeded":
        _, backoff = manifests.step_policy(spec, step)
        attempts = max(int(get_path(job, "status", "failed", default=0) or 0),
                       len(counted_failures(pods))) or backoff + 1
        return (last[0] if last and last[0] != "StepFailed" else "BackoffLimitExceeded"), shorten(
            f"Step {step} failed {attempts} time(s), more than spec.steps.{step}.backoffLimit "
            f"({backoff}) allows{detail}")
    if job_reason == "PodFailurePolicy":
        if last:
            return last
        return "PodFailurePolicy", shorten(
            f"Step {step} failed permanently: {condition.get('message') or 'exit code rule'}")
    if last:
        return last
    message = condition.get("message") or "the Job failed"
    return condition_reason(job_reason), shorten(f"Step {step} failed: {job_reason}: {message}")


def sentence(text: str) -> str:
    """`text` without its closing period(s), to be followed by one of ours."""
    return " ".join(text.split()).rstrip(". ")


def claim_fields(name: str, spec: ChatbotTrainingSpec, step: str) -> dict[str, str]:
    """The claims a step's pod mounts → the spec field that names each."""
    workspace = manifests.workspace_claim_name(name, spec)
    fields = {workspace: ("spec.workspace.existingClaim" if spec.workspace.existing_claim
                          else "the workspace claim the operator creates")}
    for field, uri in (("spec.trainingData", spec.training_data), ("spec.modelType", spec.model_type),
                       ("spec.outputPath", spec.output_path)):
        parsed = manifests.parse_pvc_uri(uri)
        if parsed and parsed[0] in manifests.claim_mounts(spec, step):
            fields.setdefault(parsed[0], field)
    return fields


_MISSING_CLAIM = re.compile(r'persistentvolumeclaim "([^"]+)" not found', re.IGNORECASE)


def _claim_problem(state: StepState, scheduler: str, spec: ChatbotTrainingSpec,
                   namespace: str, name: str) -> tuple[str, str] | None:
    fields = claim_fields(name, spec, state.step)
    if match := _MISSING_CLAIM.search(scheduler):
        claim = match.group(1)
        field = fields.get(claim, "the step's volumes")
        fix = ("it is created with the first step; check the operator's events and logs"
               if field.startswith("the workspace") else f"create it or correct {field}")
        return "ClaimNotFound", shorten(
            f"Step {state.step} cannot start: PersistentVolumeClaim {claim} ({field}) does not "
            f"exist in namespace {namespace}. Waiting; {fix}.")
    if "unbound immediate persistentvolumeclaims" in scheduler.lower():
        claims = ", ".join(f"{claim} ({field})" for claim, field in fields.items())
        return "ClaimNotBound", shorten(
            f"Step {state.step} cannot start: a claim it mounts is not bound ({claims}). "
            f"Waiting; check the claim's StorageClass and that a volume can be provisioned.")
    return None


def _unschedulable_message(step: str, scheduler: str, spec: ChatbotTrainingSpec,
                           config: OperatorConfig) -> str:
    wants = []
    if step in manifests.GPU_STEPS:
        if spec.gpu.count > 0:
            wants.append(f"{spec.gpu.count} x {spec.gpu.resource_name}")
        selector = {**config.default_node_selector, **spec.node_selector}
        if selector:
            pairs = ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))
            wants.append(f"a node matching nodeSelector {pairs}")
    needs = f" It needs {' on '.join(wants)}." if wants else ""
    hint = ("add such nodes or adjust spec.gpu, spec.nodeSelector and spec.tolerations"
            if step in manifests.GPU_STEPS else "add capacity or lower spec.resources")
    return shorten(f"Step {step} cannot be scheduled: {sentence(scheduler) or 'no node fits'}."
                  f"{needs} Waiting; {hint}.")


_NO_PRIORITY_CLASS = re.compile(r"no PriorityClass with name (\S+) was found")


_NO_SERVICE_ACCOUNT = re.compile(r'serviceaccount "([^"]+)" not found', re.IGNORECASE)


def failed_create(events: Iterable[Mapping[str, Any]], job: Mapping[str, Any]) -> str | None:
    """The latest reason the Job controller could not create the Job's pod (its `FailedCreate`
    Events), or None."""
    uid, name = get_path(job, "metadata", "uid"), get_path(job, "metadata", "name")
    found = [e for e in events if e.get("reason") == "FailedCreate"
             and get_path(e, "involvedObject", "kind") == "Job"
             and get_path(e, "involvedObject", "name") == name
             and get_path(e, "involvedObject", "uid") in (None, uid)]
    if not found:
        return None
    latest = max(found, key=lambda e: (e.get("lastTimestamp") or e.get("eventTime")
                                       or get_path(e, "metadata", "creationTimestamp") or ""))
    return sentence(str(latest.get("message") or "")).removeprefix("Error creating: ")


def _pod_create_problem(step: str, refusal: str, spec: ChatbotTrainingSpec,
                        namespace: str) -> tuple[str, str]:
    what = f"Step {step} cannot create its pod: {refusal}. Waiting"
    if "exceeded quota" in refusal:
        return "QuotaExceeded", shorten(
            f"{what}; raise the ResourceQuota of namespace {namespace} or lower "
            f"spec.resources (the Job controller retries).")
    if match := _NO_PRIORITY_CLASS.search(refusal):
        return "PriorityClassNotFound", shorten(
            f"{what}; create PriorityClass {match.group(1)} or correct spec.priorityClassName.")
    if match := _NO_SERVICE_ACCOUNT.search(refusal):
        return "ServiceAccountNotFound", shorten(
            f"{what}; create ServiceAccount {match.group(1)} in namespace {namespace} or "
            f"correct spec.serviceAccountName.")
    return "PodCreateRefused", shorten(
        f"{what}; check the namespace's admission rules (ResourceQuota, LimitRange, Pod "
        f"Security, webhooks) against the step's pod.")


def needs_events(state: StepState) -> bool:
    """Whether the step's Job waits for a pod that the Job controller may fail to create."""
    status = get_path(state.job, "status", default={}) or {}
    return (state.job is not None and not state.pods and not state.suspended
            and not int(status.get("active") or 0) and not int(status.get("ready") or 0)
            and state.phase in ("Pending", "Running"))


def diagnose_waiting(
    state: StepState, spec: ChatbotTrainingSpec, config: OperatorConfig,
    events: Iterable[Mapping[str, Any]] = (), namespace: str = "", name: str = "",
) -> tuple[str, str] | None:
    """Why a created step is not making progress (reason, message), or None."""
    step = state.step
    failing = job_condition(state.job or {}, "FailureTarget")
    if failing is not None:
        why = failing.get("reason") or "StepFailed"
        return "StepFailing", shorten(
            f"Step {step} is failing ({why}); the Job controller is stopping its pods")
    if state.suspended and not state.suspended_by_operator:
        queue = f" in queue {spec.queue_name}" if spec.queue_name else ""
        return "Queued", f"Step {step} is waiting for admission{queue} (Job {state.job_name} is suspended)"
    if state.suspended and state.suspended_by_operator:
        return "Resuming", f"Step {step} is being resumed"
    if needs_events(state) and state.job is not None:
        refusal = failed_create(events, state.job)
        if refusal:
            return _pod_create_problem(step, refusal, spec, namespace)
    for pod in reversed(state.pods):
        if get_path(pod, "status", "phase") not in (None, "Pending", "Running"):
            continue
        waiting = get_path(container_status(pod), "state", "waiting") or {}
        reason = waiting.get("reason")
        if reason in IMAGE_PULL_REASONS:
            image = container_status(pod).get("image") or spec.image or config.trainer_image
            return reason, shorten(
                f"Step {step} cannot pull the trainer image {image} ({reason}: "
                f"{waiting.get('message', '').strip() or 'pull failed'}): check spec.image "
                f"and spec.imagePullSecrets")
        if reason in CONFIG_REASONS:
            hint = (f"check that Secret {spec.env_from_secret} (spec.envFromSecret) exists"
                    if spec.env_from_secret else "check the step's volumes and secrets")
            return reason, shorten(f"Step {step} cannot start its container ({reason}: "
                                  f"{waiting.get('message', '')}): {hint}")
        for condition in get_path(pod, "status", "conditions", default=[]) or []:
            if (condition.get("type") == "PodScheduled" and condition.get("status") == "False"
                    and condition.get("reason") == "Unschedulable"):
                scheduler = condition.get("message", "")
                return _claim_problem(state, scheduler, spec, namespace, name) or (
                    "Unschedulable", _unschedulable_message(step, scheduler, spec, config))
        break  # only the newest live pod matters
    failed = counted_failures(state.pods)
    if failed:
        detail = pod_failure_detail(step, failed[-1], spec)
        _, backoff = manifests.step_policy(spec, step)
        what = f": {detail[1]}" if detail else ""
        if len(failed) > backoff:
            return "BackoffLimitReached", shorten(
                f"Step {step} failed {len(failed)} time(s), as many as "
                f"spec.steps.{step}.backoffLimit ({backoff}) allows; the Job is failing{what}")
        return "Retrying", shorten(
            f"Step {step} attempt {len(failed)} of {backoff + 1} failed, retrying{what}")
    return None
