"""Pure reconciliation logic: from a ChatbotTraining and its Jobs and Pods to the next action
and the new status.

Nothing here talks to the API server. `plan()` is called with fresh lists of the training's
step Jobs and Pods and returns what to do (create the next step's Job, suspend or resume a
Job) and the complete status the training should have afterwards. `status_patch()` turns
the old and new status into a JSON merge patch and `transition_events()` into the
Kubernetes Events worth posting.

Rules:
- Steps run in order; a step's Job is created only after the previous step's Job succeeded.
- A step recorded as Succeeded stays so (its summary is kept) even if its Job is gone.
- Succeeded and Failed are final: no new work is ever created for such a training.
- While spec.suspend is true no Job is created and the running Job is suspended.
- A failure is explained from the most specific source: the trainer's own termination
  message, then the Pod (OOMKilled), then the Job condition (deadline, retries). A step
  fails with the Job's terminal `Failed` condition; `FailureTarget` comes earlier, before
  the Job controller has counted every failed pod, so it only says the step is failing.
- A failed multi-node train Job is made again, up to its backoffLimit + 1 attempts, unless
  retrying cannot help (see multinode.py); the latest attempt is the step's Job.
- A step that waits is explained too: its pods refused by admission (the Job's
  `FailedCreate` Events: quota, missing PriorityClass or ServiceAccount), a claim that does
  not exist, scheduling, image pulls, configuration, retries.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pydantic

from chatbot_api.spec import NAME_RULE, STEPS, ChatbotTrainingSpec
from chatbot_api.status import ChatbotTrainingStatus

from chatbot_operator import live_progress, manifests, multinode
from chatbot_operator.settings import OperatorConfig

TERMINAL_PHASES = ("Succeeded", "Failed")
CONDITION_TYPES = ("Ready", "Progressing", "Failed", "Suspended")
IMAGE_PULL_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName")
CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError")
# Why a created step's pod cannot be created or started (reasons of Warning events).
POD_CREATE_REASONS = ("QuotaExceeded", "PriorityClassNotFound", "ServiceAccountNotFound",
                      "PodCreateRefused")
CLAIM_REASONS = ("ClaimNotFound", "ClaimNotBound")
WAITING_PROBLEMS = (("Unschedulable",) + IMAGE_PULL_REASONS + CONFIG_REASONS + POD_CREATE_REASONS
                    + CLAIM_REASONS)
MAX_MESSAGE = 1024


# ----------------------------------------------------------------------------- helpers


def now_iso(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def duration_seconds(start: str | None, end: str | None) -> float | None:
    begin, finish = parse_time(start), parse_time(end)
    if begin is None or finish is None:
        return None
    return max(0.0, (finish - begin).total_seconds())


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _get(obj: Any, *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return default
        obj = obj[key]
    return obj if obj is not None else default


def _reason(text: str | None, fallback: str = "StepFailed") -> str:
    """A valid metav1.Condition reason (CamelCase letters, digits, underscores)."""
    if not text:
        return fallback
    words = re.split(r"[^A-Za-z0-9_]+", text)
    candidate = "".join(w[:1].upper() + w[1:] for w in words if w)
    if not candidate or not candidate[0].isalpha():
        return fallback
    return candidate[:128]


def _short(text: str | None, limit: int = MAX_MESSAGE) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# ----------------------------------------------------------------------------- pods


def _json_safe(value: Any) -> Any:
    """NaN and infinities (a diverged loss) are not JSON: the API server would refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def container_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    statuses = _get(pod, "status", "containerStatuses", default=[]) or []
    for status in statuses:
        if status.get("name") == manifests.CONTAINER:
            return status
    return statuses[0] if statuses else {}


def terminated_state(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    status = container_status(pod)
    return _get(status, "state", "terminated") or _get(status, "lastState", "terminated")


def termination_message(pod: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(the trainer's JSON summary, or None; the raw text when it is not the trainer's JSON)."""
    terminated = terminated_state(pod)
    text = (terminated or {}).get("message")
    if not text:
        return None, None
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        return None, text.strip()
    if isinstance(data, dict) and "ok" in data:
        return _json_safe(data), None
    return None, text.strip()


def _creation_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    return (_get(obj, "metadata", "creationTimestamp", default=""),
            _get(obj, "metadata", "name", default=""))


def pods_of_job(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]], step: str) -> list:
    """The pods of a step's Job, oldest first."""
    job_uid = _get(job, "metadata", "uid")
    job_name = _get(job, "metadata", "name")
    result = []
    for pod in pods:
        pod_labels = _get(pod, "metadata", "labels", default={})
        controller = pod_labels.get("batch.kubernetes.io/controller-uid") or pod_labels.get(
            "controller-uid")
        if controller and job_uid and controller != job_uid:
            continue
        owner_job = pod_labels.get("batch.kubernetes.io/job-name") or pod_labels.get("job-name")
        if owner_job and owner_job != job_name:
            continue
        if pod_labels.get(manifests.LABEL_STEP) != step:
            continue
        result.append(pod)
    return sorted(result, key=_creation_key)


def _pod_started(pod: Mapping[str, Any]) -> bool:
    return _get(pod, "status", "phase") in ("Running", "Succeeded", "Failed")


def _disrupted(pod: Mapping[str, Any]) -> bool:
    """Preempted, evicted or drained: the Job's podFailurePolicy does not count it."""
    return any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
               for c in _get(pod, "status", "conditions", default=[]) or [])


def counted_failures(pods: Iterable[Mapping[str, Any]]) -> list:
    """The failed pods of a step that count against its backoffLimit."""
    return [p for p in pods if _get(p, "status", "phase") == "Failed" and not _disrupted(p)]


# ----------------------------------------------------------------------------- steps


@dataclasses.dataclass
class StepState:
    step: str
    phase: str = "Pending"  # a StepPhase
    job: Mapping[str, Any] | None = None
    job_name: str | None = None
    pods: list = dataclasses.field(default_factory=list)
    start_time: str | None = None
    completion_time: str | None = None
    attempts: int | None = None
    reason: str | None = None
    message: str | None = None
    summary: dict[str, Any] | None = None
    started: bool = False  # a pod of this step has run
    world_size: int | None = None  # train: processes (torchrun)
    nodes: int | None = None

    @property
    def suspended(self) -> bool:
        return bool(_get(self.job, "spec", "suspend"))

    @property
    def suspended_by_operator(self) -> bool:
        annotations = _get(self.job, "metadata", "annotations", default={})
        return annotations.get(manifests.ANNOTATION_SUSPENDED) == "true"

    def to_status(self) -> dict[str, Any]:
        data = {
            "phase": self.phase,
            "jobName": self.job_name,
            "startTime": self.start_time,
            "completionTime": self.completion_time,
            "attempts": self.attempts,
            "reason": self.reason,
            "message": self.message,
            "summary": self.summary,
            "worldSize": self.world_size,
            "nodes": self.nodes,
        }
        return {key: value for key, value in data.items() if value is not None}


def _job_condition(job: Mapping[str, Any], *types: str) -> Mapping[str, Any] | None:
    for condition in _get(job, "status", "conditions", default=[]) or []:
        if condition.get("type") in types and condition.get("status") == "True":
            return condition
    return None


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
            return _from_recorded(step, recorded)
        return StepState(step=step)

    job_pods = pods_of_job(job, pods, step)
    status = job.get("status") or {}
    # The Job controller raises status.failed only after it tracked the pod: count both.
    failures = max(int(status.get("failed") or 0), len(counted_failures(job_pods)))
    finished = int(status.get("succeeded") or 0) + failures
    state = StepState(
        step=step,
        job=job,
        job_name=_get(job, "metadata", "name"),
        pods=job_pods,
        start_time=status.get("startTime") or _get(job, "metadata", "creationTimestamp"),
        attempts=max(len(job_pods), finished + (1 if int(status.get("active") or 0) else 0)) or None,
        started=(finished > 0 or int(status.get("ready") or 0) > 0
                 or any(_pod_started(pod) for pod in job_pods)),
    )

    complete = _job_condition(job, "Complete")
    failed = _job_condition(job, "Failed")
    if complete is not None or recorded.get("phase") == "Succeeded":
        state.phase = "Succeeded"
        state.completion_time = (status.get("completionTime") or _get(complete, "lastTransitionTime")
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
        return _from_recorded(step, recorded, state)
    else:
        state.phase = "Running" if state.started and not state.suspended else "Pending"
    return state


def _from_recorded(step: str, recorded: Mapping[str, Any], base: StepState | None = None) -> StepState:
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


# ----------------------------------------------------------------------------- explanations


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


def _pod_failure_detail(step: str, pod: Mapping[str, Any], spec: ChatbotTrainingSpec) -> tuple[str, str] | None:
    """(reason, message) from one failed pod, or None when it says nothing useful."""
    data, raw = termination_message(pod)
    if data is not None and not data.get("ok"):
        reason = _reason(data.get("reason"))
        return reason, _short(data.get("message") or reason)
    terminated = terminated_state(pod) or {}
    if terminated.get("reason") == "OOMKilled":
        return "OOMKilled", _oom_message(step, spec)
    code = terminated.get("exitCode")
    if code:
        reason, meaning = _exit_code_meaning(code)
        tail = f"; last output: {_short(raw, 300)}" if raw else ""
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
            reason = _reason(data.get("reason"))
            return reason, _short(f"Step {step} failed: {data.get('message') or reason}")
    # 2. The kernel's: the container ran out of its memory limit.
    for pod in reversed(failed_pods):
        if (terminated_state(pod) or {}).get("reason") == "OOMKilled":
            return "OOMKilled", _oom_message(step, spec)
    # 3. The Job's condition.
    condition = _job_condition(job, "Failed", "FailureTarget") or {}
    job_reason = condition.get("reason") or "StepFailed"
    last = _pod_failure_detail(step, failed_pods[-1], spec) if failed_pods else None
    detail = f": {last[1]}" if last else ""
    if job_reason == "DeadlineExceeded":
        deadline, _ = manifests.step_policy(spec, step)
        return "DeadlineExceeded", (
            f"Step {step} ran longer than its deadline of {deadline}s and was stopped: "
            f"raise spec.steps.{step}.activeDeadlineSeconds or make the step faster")
    if job_reason == "BackoffLimitExceeded":
        _, backoff = manifests.step_policy(spec, step)
        attempts = max(int(_get(job, "status", "failed", default=0) or 0),
                       len(counted_failures(pods))) or backoff + 1
        return (last[0] if last and last[0] != "StepFailed" else "BackoffLimitExceeded"), _short(
            f"Step {step} failed {attempts} time(s), more than spec.steps.{step}.backoffLimit "
            f"({backoff}) allows{detail}")
    if job_reason == "PodFailurePolicy":
        if last:
            return last
        return "PodFailurePolicy", _short(
            f"Step {step} failed permanently: {condition.get('message') or 'exit code rule'}")
    if last:
        return last
    message = condition.get("message") or "the Job failed"
    return _reason(job_reason), _short(f"Step {step} failed: {job_reason}: {message}")


def _sentence(text: str) -> str:
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
        return "ClaimNotFound", _short(
            f"Step {state.step} cannot start: PersistentVolumeClaim {claim} ({field}) does not "
            f"exist in namespace {namespace}. Waiting; {fix}.")
    if "unbound immediate persistentvolumeclaims" in scheduler.lower():
        claims = ", ".join(f"{claim} ({field})" for claim, field in fields.items())
        return "ClaimNotBound", _short(
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
    return _short(f"Step {step} cannot be scheduled: {_sentence(scheduler) or 'no node fits'}."
                  f"{needs} Waiting; {hint}.")


_NO_PRIORITY_CLASS = re.compile(r"no PriorityClass with name (\S+) was found")
_NO_SERVICE_ACCOUNT = re.compile(r'serviceaccount "([^"]+)" not found', re.IGNORECASE)


def failed_create(events: Iterable[Mapping[str, Any]], job: Mapping[str, Any]) -> str | None:
    """The latest reason the Job controller could not create the Job's pod (its `FailedCreate`
    Events), or None."""
    uid, name = _get(job, "metadata", "uid"), _get(job, "metadata", "name")
    found = [e for e in events if e.get("reason") == "FailedCreate"
             and _get(e, "involvedObject", "kind") == "Job"
             and _get(e, "involvedObject", "name") == name
             and _get(e, "involvedObject", "uid") in (None, uid)]
    if not found:
        return None
    latest = max(found, key=lambda e: (e.get("lastTimestamp") or e.get("eventTime")
                                       or _get(e, "metadata", "creationTimestamp") or ""))
    return _sentence(str(latest.get("message") or "")).removeprefix("Error creating: ")


def _pod_create_problem(step: str, refusal: str, spec: ChatbotTrainingSpec,
                        namespace: str) -> tuple[str, str]:
    what = f"Step {step} cannot create its pod: {refusal}. Waiting"
    if "exceeded quota" in refusal:
        return "QuotaExceeded", _short(
            f"{what}; raise the ResourceQuota of namespace {namespace} or lower "
            f"spec.resources (the Job controller retries).")
    if match := _NO_PRIORITY_CLASS.search(refusal):
        return "PriorityClassNotFound", _short(
            f"{what}; create PriorityClass {match.group(1)} or correct spec.priorityClassName.")
    if match := _NO_SERVICE_ACCOUNT.search(refusal):
        return "ServiceAccountNotFound", _short(
            f"{what}; create ServiceAccount {match.group(1)} in namespace {namespace} or "
            f"correct spec.serviceAccountName.")
    return "PodCreateRefused", _short(
        f"{what}; check the namespace's admission rules (ResourceQuota, LimitRange, Pod "
        f"Security, webhooks) against the step's pod.")


def needs_events(state: StepState) -> bool:
    """Whether the step's Job waits for a pod that the Job controller may fail to create."""
    status = _get(state.job, "status", default={}) or {}
    return (state.job is not None and not state.pods and not state.suspended
            and not int(status.get("active") or 0) and not int(status.get("ready") or 0)
            and state.phase in ("Pending", "Running"))


def diagnose_waiting(
    state: StepState, spec: ChatbotTrainingSpec, config: OperatorConfig,
    events: Iterable[Mapping[str, Any]] = (), namespace: str = "", name: str = "",
) -> tuple[str, str] | None:
    """Why a created step is not making progress (reason, message), or None."""
    step = state.step
    failing = _job_condition(state.job or {}, "FailureTarget")
    if failing is not None:
        why = failing.get("reason") or "StepFailed"
        return "StepFailing", _short(
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
        if _get(pod, "status", "phase") not in (None, "Pending", "Running"):
            continue
        waiting = _get(container_status(pod), "state", "waiting") or {}
        reason = waiting.get("reason")
        if reason in IMAGE_PULL_REASONS:
            image = container_status(pod).get("image") or spec.image or config.trainer_image
            return reason, _short(
                f"Step {step} cannot pull the trainer image {image} ({reason}: "
                f"{waiting.get('message', '').strip() or 'pull failed'}): check spec.image "
                f"and spec.imagePullSecrets")
        if reason in CONFIG_REASONS:
            hint = (f"check that Secret {spec.env_from_secret} (spec.envFromSecret) exists"
                    if spec.env_from_secret else "check the step's volumes and secrets")
            return reason, _short(f"Step {step} cannot start its container ({reason}: "
                                  f"{waiting.get('message', '')}): {hint}")
        for condition in _get(pod, "status", "conditions", default=[]) or []:
            if (condition.get("type") == "PodScheduled" and condition.get("status") == "False"
                    and condition.get("reason") == "Unschedulable"):
                scheduler = condition.get("message", "")
                return _claim_problem(state, scheduler, spec, namespace, name) or (
                    "Unschedulable", _unschedulable_message(step, scheduler, spec, config))
        break  # only the newest live pod matters
    failed = counted_failures(state.pods)
    if failed:
        detail = _pod_failure_detail(step, failed[-1], spec)
        _, backoff = manifests.step_policy(spec, step)
        what = f": {detail[1]}" if detail else ""
        if len(failed) > backoff:
            return "BackoffLimitReached", _short(
                f"Step {step} failed {len(failed)} time(s), as many as "
                f"spec.steps.{step}.backoffLimit ({backoff}) allows; the Job is failing{what}")
        return "Retrying", _short(
            f"Step {step} attempt {len(failed)} of {backoff + 1} failed, retrying{what}")
    return None


# ----------------------------------------------------------------------------- results


def _summary_number(summary: Mapping[str, Any] | None, *keys: str) -> float | None:
    for key in keys:
        value = _get(summary, *key.split("."))
        number = _finite(value)
        if number is not None:
            return number
    return None


def collect_metrics(states: Mapping[str, StepState]) -> dict[str, float] | None:
    evaluate = states["evaluate"].summary or {}
    eval_metrics = evaluate.get("metrics") if isinstance(evaluate.get("metrics"), dict) else {}
    base_metrics = evaluate.get("base_metrics") if isinstance(evaluate.get("base_metrics"), dict) else {}
    train = states["train"].summary
    result = {
        "loss": _finite(eval_metrics.get("loss")),
        "accuracy": _finite(eval_metrics.get("accuracy")),
        "perplexity": _finite(eval_metrics.get("perplexity")),
        "trainLoss": _summary_number(train, "train_loss", "trainLoss", "final_loss",
                                     "metrics.train_loss", "metrics.loss", "loss"),
        "baseLoss": _finite(base_metrics.get("loss")),
        "baseAccuracy": _finite(base_metrics.get("accuracy")),
    }
    result = {key: value for key, value in result.items() if value is not None}
    return result or None


def to_pvc_uri(path: str | None, workspace_claim: str) -> str | None:
    """A path as the container saw it → `pvc://<claim>/...` (other paths unchanged)."""
    if not path:
        return path
    if path == manifests.WORKSPACE_DIR or path.startswith(manifests.WORKSPACE_DIR + "/"):
        rest = path[len(manifests.WORKSPACE_DIR):].lstrip("/")
        return f"pvc://{workspace_claim}/{rest}"
    root = manifests.PVC_ROOT + "/"
    if path.startswith(root):
        return "pvc://" + path[len(root):]
    return path


def collect_model(states: Mapping[str, StepState], workspace_claim: str) -> dict[str, Any] | None:
    export = states["export"].summary or {}
    model = export.get("model")
    if not isinstance(model, dict) or not model.get("path"):
        return None
    size = _finite(model.get("size_mb", model.get("sizeMb")))
    result: dict[str, Any] = {
        "path": to_pvc_uri(model["path"], workspace_claim),
        "format": model.get("format") or "gguf",
        "sizeMb": size if size is not None else 0.0,
    }
    base = model.get("base_model", model.get("baseModel"))
    if base:
        result["baseModel"] = str(base)
    files = []
    for item in model.get("files") or []:
        if isinstance(item, dict) and item.get("path"):
            file_size = _finite(item.get("size_mb", item.get("sizeMb")))
            files.append({
                "path": to_pvc_uri(item["path"], workspace_claim),
                "quantization": str(item.get("quantization") or ""),
                "sizeMb": file_size if file_size is not None else 0.0,
            })
    if files:
        result["files"] = files
    if model.get("modelfile"):
        result["modelfile"] = to_pvc_uri(model["modelfile"], workspace_claim)
    return result


# ----------------------------------------------------------------------------- conditions


def improvement_condition(states: Mapping[str, StepState], old: Sequence[Mapping[str, Any]] | None,
                          now: str, generation: int | None) -> dict[str, Any] | None:
    """`Improved`: whether fine-tuning lowered the eval loss below the base model's (known once
    evaluate has reported). False is a warning: the run may still succeed, unless
    evaluation.requireImprovement made evaluate fail."""
    summary = states["evaluate"].summary if "evaluate" in states else None
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        return None
    warnings = [str(w) for w in summary.get("warnings") or []]
    loss, base = _finite(summary["metrics"].get("loss")), _finite((summary.get("base_metrics") or {}).get("loss"))
    if warnings:
        status, reason, message = "False", "NotBetterThanBase", "; ".join(warnings)
    elif loss is not None and base is not None:
        status, reason, message = "True", "LowerEvalLoss", f"eval loss {loss:.4g}, base model {base:.4g}"
    else:
        return None
    prior = next((c for c in old or [] if c.get("type") == "Improved"), {})
    condition = {
        "type": "Improved", "status": status, "reason": reason, "message": _short(message),
        "lastTransitionTime": prior.get("lastTransitionTime") if prior.get("status") == status
        and prior.get("lastTransitionTime") else now,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def build_conditions(
    phase: str,
    reason: str,
    message: str,
    old: Sequence[Mapping[str, Any]] | None,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    active = phase in ("Pending", "Running")
    # type → (status, reason, whether the phase message explains this condition)
    wanted = {
        "Ready": (phase == "Succeeded", reason if phase != "Succeeded" else "Succeeded", True),
        "Progressing": (active, reason if active or phase == "Failed" else phase, True),
        "Failed": (phase == "Failed", reason if phase == "Failed" else "NotFailed",
                   phase == "Failed"),
        "Suspended": (phase == "Suspended", "Suspended" if phase == "Suspended"
                      else "NotSuspended", phase == "Suspended"),
    }
    previous = {c.get("type"): c for c in old or []}
    conditions = []
    for ctype in CONDITION_TYPES:
        status_bool, creason, explained = wanted[ctype]
        status = "True" if status_bool else "False"
        prior = previous.get(ctype) or {}
        condition = {
            "type": ctype,
            "status": status,
            "reason": _reason(creason, "Unknown"),
            "message": message if explained else "",
            "lastTransitionTime": (prior.get("lastTransitionTime")
                                   if prior.get("status") == status and prior.get("lastTransitionTime")
                                   else now),
        }
        if generation is not None:
            condition["observedGeneration"] = generation
        conditions.append(condition)
    return conditions


# ----------------------------------------------------------------------------- plan


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
    owners = _get(obj, "metadata", "ownerReferences", default=[]) or []
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
    namespace = meta.get("namespace", "")
    uid = meta.get("uid")
    generation = meta.get("generation")
    old = dict(training.get("status") or {})
    old_steps = old.get("steps") or {}
    pods, jobs = list(pods), list(jobs)

    def finish(phase: str, step: str | None, reason: str, message: str,
               states: Mapping[str, StepState], spec: ChatbotTrainingSpec | None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        message = _short(message)
        status: dict[str, Any] = {
            "phase": phase,
            "step": step,
            "reason": _reason(reason, phase),
            "message": message,
            "observedGeneration": generation,
            "startTime": old.get("startTime"),
            "completionTime": old.get("completionTime"),
            "workspaceClaim": old.get("workspaceClaim"),
            "configMap": old.get("configMap"),
            "steps": {s: st.to_status() for s, st in states.items()
                      if st.job_name or st.phase != "Pending"},
            "conditions": build_conditions(phase, reason, message, old.get("conditions"), now,
                                           generation),
        }
        if spec is not None:
            claim = manifests.workspace_claim_name(name, spec)
            status["workspaceClaim"] = claim
            status["configMap"] = manifests.config_map_name(name)
            status["metrics"] = collect_metrics(states)
            status["model"] = collect_model(states, claim)
            improved = improvement_condition(states, old.get("conditions"), now, generation)
            if improved:
                status["conditions"].append(improved)
        if extra:
            status.update(extra)
        started = [st.start_time for st in states.values() if st.start_time]
        if not status["startTime"] and (started or status["steps"]):
            status["startTime"] = min(started) if started else now
        if phase in TERMINAL_PHASES and not status["completionTime"]:
            ends = [states[step].completion_time] if step and step in states else []
            status["completionTime"] = next((e for e in ends if e), now)
        # the running step's live progress stays while that step runs and its report is fresh
        status["progress"] = live_progress.carried(old.get("progress"), status, now,
                                                   config.progress_seconds)
        # Validate against the API model: what the CRD schema would accept.
        ChatbotTrainingStatus.model_validate({k: v for k, v in status.items() if v is not None})
        return {k: v for k, v in status.items() if v is not None}

    if not NAME_RULE.holds(name) and not old_steps and not jobs:
        # The CRD refuses such names; one created before that rule never gets a Job.
        message = f"The name {name!r} is invalid: {NAME_RULE.message} (it has {len(name)})"
        return Plan(status=finish("Failed", None, "InvalidName", message, {}, None))
    try:
        spec = ChatbotTrainingSpec.model_validate(training.get("spec") or {})
    except pydantic.ValidationError as error:
        message = f"The spec is invalid: {_spec_error(error)}"
        states = {s: _from_recorded(s, old_steps[s]) for s in STEPS if s in old_steps}
        return Plan(status=finish("Failed", old.get("step"), "InvalidSpec", message, states, None))

    step_jobs: dict[str, Mapping[str, Any]] = {}
    foreign: dict[str, Mapping[str, Any]] = {}
    for job in jobs:
        step = _get(job, "metadata", "labels", manifests.LABEL_STEP)
        if step not in STEPS or not multinode.matches_step_job(name, step, job):
            continue
        jobs_of_step = step_jobs if _owned_by(job, uid) else foreign
        if multinode.attempt_of(job) >= multinode.attempt_of(jobs_of_step.get(step)):
            jobs_of_step[step] = job  # the latest attempt

    states = {step: observe_step(step, step_jobs.get(step), pods, spec, old_steps.get(step))
              for step in STEPS}
    multinode.describe(states["train"], spec)
    result = Plan(status={}, spec=spec, states=states)
    retry = multinode.next_attempt(name, spec, states["train"])
    if retry is not None:  # a failed multi-node attempt: the train Job is made again
        states["train"] = StepState(
            step="train", job_name=retry.job_name, attempts=retry.attempt, started=True,
            start_time=states["train"].start_time, world_size=states["train"].world_size,
            nodes=states["train"].nodes, reason="StepRetrying", message=retry.message)
        result.attempt, result.retry_message = retry.attempt, retry.message

    failed = next((states[s] for s in STEPS if states[s].phase == "Failed"), None)
    current = next((states[s] for s in STEPS if states[s].phase != "Succeeded"), None)
    sticky = old.get("phase") in TERMINAL_PHASES and old.get("reason") != "InvalidSpec"

    if failed is not None:
        result.status = finish("Failed", failed.step, failed.reason or "StepFailed",
                               failed.message or f"Step {failed.step} failed", states, spec)
        return result
    if current is None:
        model = collect_model(states, manifests.workspace_claim_name(name, spec))
        where = f": {model['path']}" if model else ""
        result.status = finish("Succeeded", STEPS[-1], "Succeeded",
                               f"Training succeeded; the model is exported{where}", states, spec)
        return result
    if sticky:
        result.status = finish(old["phase"], old.get("step"), old.get("reason") or old["phase"],
                               old.get("message") or "", states, spec)
        return result

    any_started = any(st.started for st in states.values())
    step = current.step
    if step in foreign and current.job is None:
        result.status = finish(
            "Pending", step, "WaitingForOldJob",
            f"Job {manifests.job_name(name, step)} belongs to an earlier ChatbotTraining of the "
            f"same name; waiting for the garbage collector to delete it", states, spec)
        return result

    if spec.suspend:
        if current.job is not None and not current.suspended:
            result.suspend_jobs[current.job_name or ""] = True
        result.status = finish("Suspended", step, "Suspended",
                               f"Suspended by spec.suspend at step {step}; set it to false to "
                               f"resume", states, spec)
        return result

    if current.job is None:
        result.create_step = step
        current.job_name = multinode.job_name_for(name, spec, step, result.attempt)
        current.phase = "Pending"
        current.start_time = current.start_time or now
        phase = "Running" if any_started else "Pending"
        result.status = finish(phase, step, "StepRetrying" if result.retry_message else "StepStarting",
                               result.retry_message or f"Starting step {step} (Job {current.job_name})",
                               states, spec)
        return result

    if current.suspended and current.suspended_by_operator:
        result.suspend_jobs[current.job_name or ""] = False
    if events is None and needs_events(current):
        result.events_of_job = current.job
    diagnosis = diagnose_waiting(current, spec, config, events or (), namespace, name)
    phase = "Running" if any_started else "Pending"
    if diagnosis is not None:
        reason, message = diagnosis
    elif current.phase == "Running":
        reason, message = "StepRunning", f"Step {step} is running (Job {current.job_name})"
    else:
        reason, message = "StepPending", f"Step {step} is waiting to start (Job {current.job_name})"
    result.status = finish(phase, step, reason, message, states, spec)
    return result


def rejected(status: Mapping[str, Any], step: str, what: str, message: str, now: str,
             generation: int | None) -> dict[str, Any]:
    """The status after the API server refused an object a step needs (`what`, e.g.
    "PersistentVolumeClaim bot-workspace"; an invalid manifest): final. The reason names the
    kind: JobRejected, PersistentVolumeClaimRejected, ConfigMapRejected."""
    reason = _reason(f"{what.split()[0]}Rejected")
    text = _short(f"The API server rejected {what} of step {step}: {_sentence(message)}")
    new = dict(status)
    new.update(phase="Failed", step=step, reason=reason, message=text, completionTime=now)
    steps = dict(new.get("steps") or {})
    steps[step] = {**steps.get(step, {}), "phase": "Failed", "reason": reason,
                   "message": text, "completionTime": now}
    new["steps"] = steps
    new["conditions"] = build_conditions("Failed", reason, text, status.get("conditions"), now,
                                         generation)
    return new


def with_problem(status: Mapping[str, Any], reason: str, message: str, now: str,
                 generation: int | None) -> dict[str, Any]:
    """The status while an API call keeps failing (not final: the operator retries)."""
    new = dict(status)
    new.update(reason=_reason(reason), message=_short(message))
    new["conditions"] = build_conditions(new.get("phase", "Pending"), reason, new["message"],
                                         status.get("conditions"), now, generation)
    return new


# ----------------------------------------------------------------------------- diffs & events


def status_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) turning `old` into `new`; empty when nothing changed."""
    old = old or {}
    patch: dict[str, Any] = {}
    for key in set(old) | set(new):
        if key not in new:
            patch[key] = None
        elif key not in old:
            patch[key] = new[key]
        elif isinstance(old[key], Mapping) and isinstance(new[key], Mapping):
            sub = status_patch(old[key], new[key])
            if sub:
                patch[key] = sub
        elif old[key] != new[key]:
            patch[key] = new[key]
    return patch


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class StepTransition:
    step: str
    phase: str  # Succeeded | Failed
    seconds: float | None


def step_transitions(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[StepTransition]:
    """Steps that finished between the old and the new status (for events and metrics)."""
    old_steps = (old or {}).get("steps") or {}
    result = []
    for step in STEPS:
        entry = (new.get("steps") or {}).get(step) or {}
        phase = entry.get("phase")
        if phase in TERMINAL_PHASES and (old_steps.get(step) or {}).get("phase") != phase:
            result.append(StepTransition(step, phase, duration_seconds(
                entry.get("startTime"), entry.get("completionTime"))))
    return result


def transition_events(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[Event]:
    old = old or {}
    events = []
    for change in step_transitions(old, new):
        entry = new["steps"][change.step]
        took = f" in {format_duration(change.seconds)}" if change.seconds is not None else ""
        if change.phase == "Succeeded":
            events.append(Event("Normal", "StepSucceeded",
                                f"Step {change.step} succeeded{took} (Job {entry.get('jobName')})"))
        else:
            events.append(Event("Warning", "StepFailed",
                                f"Step {change.step} failed ({entry.get('reason')}): "
                                f"{entry.get('message', '')}"))
    phase, old_phase = new.get("phase"), old.get("phase")
    if phase != old_phase:
        if phase == "Succeeded":
            events.append(Event("Normal", "Succeeded", new.get("message", "Training succeeded")))
        elif phase == "Failed":
            events.append(Event("Warning", new.get("reason") or "Failed", new.get("message", "")))
        elif phase == "Suspended":
            events.append(Event("Normal", "Suspended", new.get("message", "")))
        elif old_phase == "Suspended":
            events.append(Event("Normal", "Resumed", f"Resumed at step {new.get('step')}"))
    elif phase in ("Pending", "Running") and new.get("reason") != old.get("reason") and new.get(
            "reason") in WAITING_PROBLEMS:
        events.append(Event("Warning", new["reason"], new.get("message", "")))
    return events
