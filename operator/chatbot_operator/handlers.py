"""Kopf handlers of the ChatbotTraining operator.

Run with `chatbot-operator` (see `__main__.py`) or `kopf run -m chatbot_operator.handlers`.

All handlers funnel into one idempotent `Reconciler.reconcile()`:
- create / resume / spec update of a ChatbotTraining (retried with backoff by Kopf),
- events of its step Jobs and Pods (label `chatbot.dev/training`), so a finished step
  starts the next one at once,
- a timer re-checking each unfinished training every CHATBOT_RESYNC_SECONDS.

Deletion: the ConfigMap and the Jobs (and through them the Pods) have a controller
ownerReference to the training, as has the workspace claim with reclaimPolicy Delete, so
the Kubernetes garbage collector deletes them (a Retain claim stays, an existingClaim is
never touched). No delete handler is needed. Kopf puts the finalizer `chatbot.dev/finalizer`
on unfinished trainings because of the re-check timer, and removes it when it sees the
deletion (or the training finishes), so deleting a training needs the operator running.

Status is written to the status subresource by the reconciler (merge patch); handlers
return nothing, so Kopf keeps only its bookkeeping annotations (prefix `chatbot.dev/`).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from chatbot_api.spec import GROUP, PLURAL, VERSION

from chatbot_operator import kube, manifests, metrics
from chatbot_operator.progress import TERMINAL_PHASES
from chatbot_operator.reconciler import Reconciler
from chatbot_operator.settings import OperatorConfig, resync_seconds_from_env

FINALIZER = f"{GROUP}/finalizer"
CHILD_LABELS = {manifests.LABEL_TRAINING: kopf.PRESENT}
# Kopf fixes a timer's interval when the handler is registered, i.e. at import.
RESYNC_SECONDS = resync_seconds_from_env()


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """Operator-specific Kopf settings (tests set their own timings on the same object)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.reporting_component = "chatbot-operator"
    settings.posting.level = logging.INFO
    # Watch only the Jobs and Pods of trainings, not every Job and Pod of the cluster.
    settings.watching.label_selectors["batch/v1", "jobs"] = manifests.LABEL_TRAINING
    settings.watching.label_selectors["v1", "pods"] = manifests.LABEL_TRAINING


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any,
                  **_: Any) -> None:
    config = memo.get("config")
    if not isinstance(config, OperatorConfig):
        config = OperatorConfig.from_env()
    memo.config = config
    configure_kopf(settings)
    memo.kube = kube.KubeClient()
    memo.reconciler = Reconciler(memo.kube, config)
    memo.metrics_runner = None
    if config.metrics_port >= 0:
        memo.metrics_runner, memo.metrics_port = await metrics.start_server(config.metrics_port)
        logger.info(f"Serving Prometheus metrics on port {memo.metrics_port} at /metrics")


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("metrics_runner") is not None:
        await memo.metrics_runner.cleanup()
    if memo.get("kube") is not None:
        await memo.kube.close()


def _retry_delay(retry: int) -> float:
    return float(min(60, 2 ** min(retry, 6)))


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile_training(namespace: str, name: str, memo: kopf.Memo, retry: int,
                             **_: Any) -> None:
    await _reconcile_or_retry(memo, namespace, name, retry)


async def _reconcile_or_retry(memo: kopf.Memo, namespace: str, name: str, retry: int) -> None:
    """Reconcile; an API failure becomes a Kopf retry with exponential backoff."""
    try:
        await memo.reconciler.reconcile(namespace, name)
    except kube.ApiError as exc:
        raise kopf.TemporaryError(f"Kubernetes API call failed: {exc}",
                                  delay=_retry_delay(retry)) from exc


def _unfinished(status: dict[str, Any], **_: Any) -> bool:
    return status.get("phase") not in TERMINAL_PHASES


@kopf.timer(GROUP, VERSION, PLURAL, when=_unfinished, interval=RESYNC_SECONDS,
            initial_delay=RESYNC_SECONDS)
async def recheck_training(namespace: str, name: str, memo: kopf.Memo, retry: int,
                           **_: Any) -> None:
    """Re-check now and then, in case an event was missed (e.g. during a watch reconnect)."""
    await _reconcile_or_retry(memo, namespace, name, retry)


def _owner_name(body: kopf.Body) -> str | None:
    annotations = body.get("metadata", {}).get("annotations") or {}
    return annotations.get(manifests.ANNOTATION_TRAINING) or (
        body.get("metadata", {}).get("labels") or {}).get(manifests.LABEL_TRAINING)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
async def step_job_changed(body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    owner = _owner_name(body)
    if owner and namespace:
        await memo.reconciler.nudge(namespace, owner)


@kopf.on.event("", "v1", "pods", labels=CHILD_LABELS)
async def step_pod_changed(body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    owner = _owner_name(body)
    if owner and namespace:
        await memo.reconciler.nudge(namespace, owner)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def training_event(type: str, namespace: str, name: str, memo: kopf.Memo,
                         **_: Any) -> None:
    if type == "DELETED":
        memo.reconciler.forget(namespace, name)
