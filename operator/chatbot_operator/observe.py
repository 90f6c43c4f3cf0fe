"""What a training's Jobs and Pods say, read without judging it.

Times and durations, the step container's state and termination message (the trainer's
summary, written as the container ended), which pods belong to a step's Job, the failed pods
that count against its retries, a Job's conditions, and ``StepState``: the record of one
step that the diagnosis, the status and the planner share.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from chatbot_operator import manifests

TERMINAL_PHASES = ("Succeeded", "Failed")


MAX_MESSAGE = 1024


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


def get_path(obj: Any, *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return default
        obj = obj[key]
    return obj if obj is not None else default


def shorten(text: str | None, limit: int = MAX_MESSAGE) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def finite_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def json_safe(value: Any) -> Any:
    """NaN and infinities (a diverged loss) are not JSON: the API server would refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def container_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    statuses = get_path(pod, "status", "containerStatuses", default=[]) or []
    for status in statuses:
        if status.get("name") == manifests.CONTAINER:
            return status
    return statuses[0] if statuses else {}


def terminated_state(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    status = container_status(pod)
    return get_path(status, "state", "terminated") or get_path(status, "lastState", "terminated")


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
        return json_safe(data), None
    return None, text.strip()


def _creation_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    return (get_path(obj, "metadata", "creationTimestamp", default=""),
            get_path(obj, "metadata", "name", default=""))


def pods_of_job(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]], step: str) -> list:
    """The pods of a step's Job, oldest first."""
    job_uid = get_path(job, "metadata", "uid")
    job_name = get_path(job, "metadata", "name")
    result = []
    for pod in pods:
        pod_labels = get_path(pod, "metadata", "labels", default={})
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


def pod_started(pod: Mapping[str, Any]) -> bool:
    return get_path(pod, "status", "phase") in ("Running", "Succeeded", "Failed")


def _disrupted(pod: Mapping[str, Any]) -> bool:
    """Preempted, evicted or drained: the Job's podFailurePolicy does not count it."""
    return any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
               for c in get_path(pod, "status", "conditions", default=[]) or [])


def counted_failures(pods: Iterable[Mapping[str, Any]]) -> list:
    """The failed pods of a step that count against its backoffLimit."""
    return [p for p in pods if get_path(p, "status", "phase") == "Failed" and not _disrupted(p)]


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
        return bool(get_path(self.job, "spec", "suspend"))

    @property
    def suspended_by_operator(self) -> bool:
        annotations = get_path(self.job, "metadata", "annotations", default={})
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


def job_condition(job: Mapping[str, Any], *types: str) -> Mapping[str, Any] | None:
    for condition in get_path(job, "status", "conditions", default=[]) or []:
        if condition.get("type") in types and condition.get("status") == "True":
            return condition
    return None
