"""Kopf handlers of the ChatbotTraining operator.

Run with `chatbot-operator` (see `__main__.py`) or `kopf run -m chatbot_operator.handlers`.

All handlers funnel into one idempotent `Reconciler.reconcile()` (see reconciler.py):
- every event of a training (its creation, a spec change, the initial listing when the
  operator starts), at once: the first step's Job is created from the training's first event;
- events of its step Jobs and Pods (label `chatbot.dev/training`), so a finished step
  starts the next one at once, and of its server's Deployment (spec.serve, serving.py);
- a timer re-checking each unfinished training every CHATBOT_RESYNC_SECONDS.
Events that bring nothing new to a training (e.g. its own status update) are skipped, and
API errors are tried again with exponential backoff by the reconciler.

Deletion: the ConfigMap, the Jobs (and through them the Pods) and the server's Deployment
and Service have a controller
ownerReference to the training, as has the workspace claim with reclaimPolicy Delete, so
the Kubernetes garbage collector deletes them (a Retain claim stays, an existingClaim is
never touched). No delete handler is needed. Kopf puts the finalizer `chatbot.dev/finalizer`
on unfinished trainings because of the re-check timer, and removes it when it sees the
deletion (or the training finishes), so deleting a training needs the operator running.

Status is written to the status subresource by the reconciler (one merge patch per
reconciliation); handlers return nothing. Writes bound a burst of new trainings on a real API
server, so each training's are kept few: its first step's claim, ConfigMap and Job; Kopf's
finalizer, then its first status (held back until Kopf's finalizer patch has landed: sent
before it, the status would change the resourceVersion that patch tests, and Kopf would send
it again); an Event. Kopf keeps no bookkeeping in the training: the handlers here are event
handlers and a timer, whose state Kopf keeps in memory.

With peering, the operator creates its peering object at startup, so the install manifests
hold no object of a kind they define themselves.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from chatbot_api.spec import GROUP, PLURAL, VERSION

from chatbot_operator import kube, logs, manifests, metrics
from chatbot_operator.observe import TERMINAL_PHASES
from chatbot_operator.reconciler import Reconciler, retry_delay
from chatbot_operator.settings import OperatorConfig, resync_seconds_from_env

FINALIZER = f"{GROUP}/finalizer"
CHILD_LABELS = {manifests.LABEL_TRAINING: kopf.PRESENT}
# Kopf fixes a timer's interval when the handler is registered, i.e. at import.
RESYNC_SECONDS = resync_seconds_from_env()


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """Operator-specific Kopf settings (tests set their own timings on the same object)."""
    settings.persistence.finalizer = FINALIZER
    # Kopf writes no progress or last-handled-configuration for event handlers and timers; a
    # create/update/delete handler would, in annotations with our prefix (a write per change).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.reporting_component = "chatbot-operator"
    settings.posting.level = logging.INFO
    # Watch only the Jobs and Pods of trainings, not every Job and Pod of the cluster.
    settings.watching.label_selectors["batch/v1", "jobs"] = manifests.LABEL_TRAINING
    settings.watching.label_selectors["v1", "pods"] = manifests.LABEL_TRAINING
    settings.watching.label_selectors["apps/v1", "deployments"] = manifests.LABEL_TRAINING


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any,
                  **_: Any) -> None:
    config = memo.get("config")
    if not isinstance(config, OperatorConfig):
        config = OperatorConfig.from_env()
    memo.config = config
    configure_kopf(settings)
    logs.quiet_routine_successes()
    memo.kube = kube.KubeClient()
    memo.reconciler = Reconciler(memo.kube, config)
    memo.metrics_runner = None
    if settings.peering.mandatory and not settings.peering.standalone:
        await ensure_peering(memo.kube, settings.peering.name,
                             None if settings.peering.clusterwide else config.namespaces, logger)
    if config.metrics_port >= 0:
        memo.metrics_runner, memo.metrics_port = await metrics.start_server(config.metrics_port)
        logger.info(f"Serving Prometheus metrics on port {memo.metrics_port} at /metrics")


async def ensure_peering(client: kube.KubeClient, name: str,
                         namespaces: tuple[str, ...] | None, logger: Any) -> None:
    """Create the peering object(s) the replicas meet in (Kopf's CRDs, shipped with the chart),
    unless they exist. Before Kopf starts watching: it pauses while its peering object is
    missing. None: cluster-wide (ClusterKopfPeering), else a KopfPeering per namespace."""
    for path, body in manifests.peering_objects(name, namespaces):
        try:
            if await client.create(path, body) is not None:
                logger.info(f"Created {body['kind']} {name} for the operator's replicas")
        except kube.ApiError as exc:
            hint = (" (are Kopf's peering CRDs installed? The chart ships them)"
                    if exc.status == 404 else "")
            logger.error(f"Cannot create {body['kind']} {name}{hint}: {exc}")


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("reconciler") is not None:
        memo.reconciler.close()
    if memo.get("metrics_runner") is not None:
        await memo.metrics_runner.cleanup()
    if memo.get("kube") is not None:
        await memo.kube.close()


def _unfinished(status: dict[str, Any], **_: Any) -> bool:
    return status.get("phase") not in TERMINAL_PHASES


@kopf.timer(GROUP, VERSION, PLURAL, when=_unfinished, interval=RESYNC_SECONDS,
            initial_delay=RESYNC_SECONDS)
async def recheck_training(namespace: str, name: str, body: kopf.Body, memo: kopf.Memo,
                           retry: int, **_: Any) -> None:
    """Re-check now and then, in case an event was missed (e.g. during a watch reconnect)."""
    try:
        await memo.reconciler.recheck(namespace, name, dict(body))
    except kube.ApiError as exc:
        if exc.reason == "ClientClosed":
            return  # the operator is stopping
        raise kopf.TemporaryError(f"Kubernetes API call failed: {exc}",
                                  delay=retry_delay(retry)) from exc


@kopf.on.event(GROUP, VERSION, PLURAL)
async def training_changed(type: str, body: kopf.Body, namespace: str, name: str,
                           memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED":
        memo.reconciler.forget(namespace, name)
        return
    # Kopf puts its finalizer on after this handler when the training lacks it (a new one):
    # status patches wait for that, or Kopf's patch would be refused and sent again.
    awaits_finalizer = (FINALIZER not in (body.metadata.get("finalizers") or [])
                        and not body.metadata.get("deletionTimestamp") and _unfinished(body.status))
    if not awaits_finalizer:
        await memo.reconciler.report_held(namespace, name)
    uid, generation = body.metadata.uid, body.metadata.get("generation")
    await memo.reconciler.nudge(
        namespace, name, unless=lambda seen: seen.uid == uid and seen.generation == generation,
        fresh=None if body.get("status") else dict(body), report_later=awaits_finalizer)


def _owner_name(body: kopf.Body) -> str | None:
    annotations = body.get("metadata", {}).get("annotations") or {}
    return annotations.get(manifests.ANNOTATION_TRAINING) or (
        body.get("metadata", {}).get("labels") or {}).get(manifests.LABEL_TRAINING)


async def _child_changed(type: str, body: kopf.Body, namespace: str, memo: kopf.Memo) -> None:
    owner = _owner_name(body)
    if not owner or not namespace:
        return
    uid, version = body.metadata.uid, body.metadata.get("resourceVersion")
    unless = None if type == "DELETED" else (lambda seen: seen.versions.get(uid) == version)
    await memo.reconciler.nudge(namespace, owner, unless=unless)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
async def step_job_changed(type: str, body: kopf.Body, namespace: str, memo: kopf.Memo,
                           **_: Any) -> None:
    await _child_changed(type, body, namespace, memo)


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
async def server_changed(type: str, body: kopf.Body, namespace: str, memo: kopf.Memo,
                         **_: Any) -> None:
    """The model's server (spec.serve): its ready pods go into status.serving."""
    await _child_changed(type, body, namespace, memo)


@kopf.on.event("", "v1", "pods", labels=CHILD_LABELS)
async def step_pod_changed(type: str, body: kopf.Body, namespace: str, memo: kopf.Memo,
                           **_: Any) -> None:
    await _child_changed(type, body, namespace, memo)
