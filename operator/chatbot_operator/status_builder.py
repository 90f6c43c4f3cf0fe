"""The status of a training: phase, conditions, metrics, model, and what changed.

``training_status()`` builds the complete status from the step states (validated against the
API model, so the CRD schema would accept it); ``status_patch()`` turns the old and new status
into a JSON merge patch and ``transition_events()`` into the Kubernetes Events worth posting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from chatbot_api.spec import STEPS, ChatbotTrainingSpec
from chatbot_api.status import ChatbotTrainingStatus, answer_status_metrics
from chatbot_operator import live_progress, manifests
from chatbot_operator.diagnose import WAITING_PROBLEMS, condition_reason, sentence
from chatbot_operator.observe import (
    TERMINAL_PHASES,
    StepState,
    duration_seconds,
    finite_or_none,
    format_duration,
    get_path,
    shorten,
)

CONDITION_TYPES = ("Ready", "Progressing", "Failed", "Suspended")


def _summary_number(summary: Mapping[str, Any] | None, *keys: str) -> float | None:
    for key in keys:
        value = get_path(summary, *key.split("."))
        number = finite_or_none(value)
        if number is not None:
            return number
    return None


def collect_metrics(states: Mapping[str, StepState]) -> dict[str, float] | None:
    evaluate = states["evaluate"].summary or {}
    eval_metrics = evaluate.get("metrics") if isinstance(evaluate.get("metrics"), dict) else {}
    base_metrics = evaluate.get("base_metrics") if isinstance(evaluate.get("base_metrics"), dict) else {}
    train = states["train"].summary
    result = {
        "loss": finite_or_none(eval_metrics.get("loss")),
        "accuracy": finite_or_none(eval_metrics.get("accuracy")),
        "perplexity": finite_or_none(eval_metrics.get("perplexity")),
        "trainLoss": _summary_number(train, "train_loss", "trainLoss", "final_loss",
                                     "metrics.train_loss", "metrics.loss", "loss"),
        "baseLoss": finite_or_none(base_metrics.get("loss")),
        "baseAccuracy": finite_or_none(base_metrics.get("accuracy")),
    }
    result = {key: value for key, value in result.items() if value is not None}
    result.update(answer_status_metrics(evaluate))  # factRecall, rougeL and the base model's
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
    size = finite_or_none(model.get("size_mb", model.get("sizeMb")))
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
            file_size = finite_or_none(item.get("size_mb", item.get("sizeMb")))
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


def improvement_condition(states: Mapping[str, StepState], old: Sequence[Mapping[str, Any]] | None,
                          now: str, generation: int | None) -> dict[str, Any] | None:
    """`Improved`: whether fine-tuning lowered the eval loss below the base model's (known once
    evaluate has reported). False is a warning: the run may still succeed, unless
    evaluation.requireImprovement made evaluate fail."""
    summary = states["evaluate"].summary if "evaluate" in states else None
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        return None
    warnings = [str(w) for w in summary.get("warnings") or []]
    loss, base = finite_or_none(summary["metrics"].get("loss")), finite_or_none((summary.get("base_metrics") or {}).get("loss"))
    if warnings:
        status, reason, message = "False", "NotBetterThanBase", "; ".join(warnings)
    elif loss is not None and base is not None:
        status, reason, message = "True", "LowerEvalLoss", f"eval loss {loss:.4g}, base model {base:.4g}"
    else:
        return None
    prior = next((c for c in old or [] if c.get("type") == "Improved"), {})
    condition = {
        "type": "Improved", "status": status, "reason": reason, "message": shorten(message),
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
            "reason": condition_reason(creason, "Unknown"),
            "message": message if explained else "",
            "lastTransitionTime": (prior.get("lastTransitionTime")
                                   if prior.get("status") == status and prior.get("lastTransitionTime")
                                   else now),
        }
        if generation is not None:
            condition["observedGeneration"] = generation
        conditions.append(condition)
    return conditions


@dataclasses.dataclass(frozen=True)
class Reconcile:
    """What every status built in one reconcile of a training shares."""

    name: str
    old: Mapping[str, Any]  # the status before
    generation: int | None
    now: str
    progress_seconds: float  # how often the live progress is polled


def training_status(at: Reconcile, phase: str, step: str | None, reason: str, message: str,
                    states: Mapping[str, StepState], spec: ChatbotTrainingSpec | None) -> dict[str, Any]:
    """The complete status: phase, step states, conditions, and with a valid spec the
    workspace, metrics and model; validated against the API model (what the CRD accepts)."""
    old, now = at.old, at.now
    message = shorten(message)
    status: dict[str, Any] = {
        "phase": phase,
        "step": step,
        "reason": condition_reason(reason, phase),
        "message": message,
        "observedGeneration": at.generation,
        "startTime": old.get("startTime"),
        "completionTime": old.get("completionTime"),
        "workspaceClaim": old.get("workspaceClaim"),
        "configMap": old.get("configMap"),
        "steps": {s: st.to_status() for s, st in states.items() if st.job_name or st.phase != "Pending"},
        "conditions": build_conditions(phase, reason, message, old.get("conditions"), now, at.generation),
    }
    if spec is not None:
        claim = manifests.workspace_claim_name(at.name, spec)
        status["workspaceClaim"] = claim
        status["configMap"] = manifests.config_map_name(at.name)
        status["metrics"] = collect_metrics(states)
        status["model"] = collect_model(states, claim)
        improved = improvement_condition(states, old.get("conditions"), now, at.generation)
        if improved:
            status["conditions"].append(improved)
    started = [st.start_time for st in states.values() if st.start_time]
    if not status["startTime"] and (started or status["steps"]):
        status["startTime"] = min(started) if started else now
    if phase in TERMINAL_PHASES and not status["completionTime"]:
        ends = [states[step].completion_time] if step and step in states else []
        status["completionTime"] = next((e for e in ends if e), now)
    # the running step's live progress stays while that step runs and its report is fresh
    status["progress"] = live_progress.carried(old.get("progress"), status, now, at.progress_seconds)
    ChatbotTrainingStatus.model_validate({k: v for k, v in status.items() if v is not None})
    return {k: v for k, v in status.items() if v is not None}


def rejected(status: Mapping[str, Any], step: str, what: str, message: str, now: str,
             generation: int | None) -> dict[str, Any]:
    """The status after the API server refused an object a step needs (`what`, e.g.
    "PersistentVolumeClaim bot-workspace"; an invalid manifest): final. The reason names the
    kind: JobRejected, PersistentVolumeClaimRejected, ConfigMapRejected."""
    reason = condition_reason(f"{what.split()[0]}Rejected")
    text = shorten(f"The API server rejected {what} of step {step}: {sentence(message)}")
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
    new.update(reason=condition_reason(reason), message=shorten(message))
    new["conditions"] = build_conditions(new.get("phase", "Pending"), reason, new["message"],
                                         status.get("conditions"), now, generation)
    return new


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
