"""Live progress of a running train or evaluate step: the pure rules.

The step's pod serves its progress as JSON on `GET /progress` (the trainer's
train/progress_server.py), on the container port named `progress` (CHATBOT_PROGRESS_PORT). The
operator reads it (live_progress_poller.py) and these rules decide what `status.progress` shows:

- which pod to read: the running pod of the training's current step, when that step is
  train or evaluate and it runs (`target`);
- a report becomes the block (`from_report`), checked against the API model, and only when
  it is a report of that step: a pod of an earlier step is never shown as the current one;
- a block stays only while its step runs, and only while it is fresh: one the operator
  could not refresh for STALE_POLLS poll intervals is removed, never shown as live
  (`refreshed` after a poll, `carried` when a reconciliation rebuilds the status).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Iterable, Mapping
from typing import Any

import pydantic

from chatbot_api.status import LiveProgress

from chatbot_operator import manifests

LIVE_STEPS = manifests.PROGRESS_STEPS
PORT_NAME = manifests.PROGRESS_PORT_NAME
PATH = "/progress"
STALE_POLLS = 3  # a report not refreshed for this many poll intervals is removed


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the progress of one training's running step is read."""

    step: str
    pod: str
    url: str


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, Mapping) else None
    return obj


def step_is_live(status: Mapping[str, Any], step: str | None) -> bool:
    """Whether `step` is the training's current step, a live one, and running now."""
    return (step in LIVE_STEPS and status.get("phase") == "Running" and status.get("step") == step
            and _get(status, "steps", step, "phase") == "Running")


def progress_port(pod: Mapping[str, Any]) -> int | None:
    for container in _get(pod, "spec", "containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == PORT_NAME and port.get("containerPort"):
                return int(port["containerPort"])
    return None


def target(status: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> Target | None:
    """The pod to read progress from (the newest running pod of the current step's Job, with
    an IP and a `progress` port); None when there is none."""
    step = status.get("step")
    if not step_is_live(status, step):
        return None
    job_name = _get(status, "steps", step, "jobName")
    candidates = []
    for pod in pods:
        labels = _get(pod, "metadata", "labels") or {}
        owner = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
        if (labels.get(manifests.LABEL_STEP) != step or owner != job_name
                or _get(pod, "status", "phase") != "Running"
                or _get(pod, "metadata", "deletionTimestamp")):
            continue
        ip, port = _get(pod, "status", "podIP"), progress_port(pod)
        if ip and port:
            candidates.append((_get(pod, "metadata", "creationTimestamp") or "", pod, ip, port))
    if not candidates:
        return None
    _, pod, ip, port = max(candidates, key=lambda c: c[0])
    host = f"[{ip}]" if ":" in ip else ip
    return Target(step=step, pod=_get(pod, "metadata", "name") or "", url=f"http://{host}:{port}{PATH}")


def format_eta(seconds: float | None) -> str | None:
    """12s, 12m, 1h05m, 2d03h."""
    if seconds is None:
        return None
    seconds = int(math.ceil(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def from_report(report: Any, step: str, now: str) -> dict[str, Any] | None:
    """The `status.progress` block for a report read at `now`; None when it is not a valid
    report of `step`."""
    if not isinstance(report, Mapping) or report.get("step") != step:
        return None
    eta = _number(report.get("eta_seconds"))
    eta = None if eta is None else max(0.0, round(eta, 1))
    block = {
        "step": step,
        "unit": report.get("unit"),
        "completed": report.get("completed"),
        "total": report.get("total"),
        "percent": _number(report.get("percent")),
        "etaSeconds": eta,
        "eta": format_eta(eta),
        "loss": _number(report.get("loss")),
        "tokensPerSecond": _number(report.get("tokens_per_second")),
        "learningRate": _number(report.get("learning_rate")),
        "phase": report.get("phase") if isinstance(report.get("phase"), str) else None,
        "lastUpdated": now,
    }
    block = {key: value for key, value in block.items() if value is not None}
    try:
        return LiveProgress.model_validate(block).to_api()
    except pydantic.ValidationError:
        return None


def _time(value: Any) -> datetime.datetime | None:
    try:
        parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def is_stale(block: Mapping[str, Any], now: str, poll_seconds: float) -> bool:
    updated, current = _time(block.get("lastUpdated")), _time(now)
    if updated is None or current is None:
        return True
    return (current - updated).total_seconds() > STALE_POLLS * poll_seconds


def carried(block: Mapping[str, Any] | None, status: Mapping[str, Any], now: str,
            poll_seconds: float) -> dict[str, Any] | None:
    """The block a rebuilt status keeps: the previous one while its step runs and it is fresh."""
    if not block or not step_is_live(status, block.get("step")) or is_stale(block, now, poll_seconds):
        return None
    return dict(block)


def refreshed(status: Mapping[str, Any], step: str, report: Any, now: str,
              poll_seconds: float) -> dict[str, Any] | None:
    """The block after one poll of `step`'s pod (`report`: what it served, None when it could
    not be read): the new report, else the previous block while fresh, else nothing."""
    if not step_is_live(status, step):  # the step has ended: whatever the status holds applies
        return carried(status.get("progress"), status, now, poll_seconds)
    block = from_report(report, step, now) if report is not None else None
    if block is not None:
        return block
    return carried(status.get("progress"), status, now, poll_seconds)


def with_progress(status: Mapping[str, Any], block: Mapping[str, Any] | None) -> dict[str, Any]:
    """`status` with `block` as its progress (none: without one)."""
    new = {key: value for key, value in status.items() if key != "progress"}
    if block:
        new["progress"] = dict(block)
    return new
