"""One reconciliation of a ChatbotTraining: read, plan (pure, `progress.plan`), act, report.

Every trigger (create/resume/update of the training, events of its Jobs and Pods, the
periodic re-check) calls the same idempotent `reconcile()`. Calls for one training are
serialized by a lock, and bursts of triggers collapse into at most one queued run. The
Jobs have deterministic names, so a concurrent or repeated create gets 409 Conflict,
which counts as done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from chatbot_api.spec import GROUP, PLURAL, VERSION, ChatbotTrainingSpec

from chatbot_operator import kube, manifests, metrics, progress
from chatbot_operator.settings import OperatorConfig

logger = logging.getLogger(__name__)


def training_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    return kube.path(GROUP, VERSION, PLURAL, namespace, name, subresource)


def jobs_path(namespace: str, name: str | None = None) -> str:
    return kube.path("batch", "v1", "jobs", namespace, name)


def core_path(plural: str, namespace: str, name: str | None = None) -> str:
    return kube.path("", "v1", plural, namespace, name)


class Reconciler:
    def __init__(self, client: kube.KubeClient, config: OperatorConfig,
                 tracker: metrics.TrainingTracker | None = None) -> None:
        self.kube = client
        self.config = config
        self.tracker = tracker or metrics.TrainingTracker()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._waiting: dict[tuple[str, str], int] = {}  # calls waiting for the lock

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        """The training is gone: drop its lock and its metrics."""
        self._locks.pop((namespace, name), None)
        self._waiting.pop((namespace, name), None)
        self.tracker.forget(namespace, name)

    async def reconcile(self, namespace: str, name: str) -> dict[str, Any] | None:
        """Bring one training a step further; returns its new status (None if it is gone)."""
        key = (namespace, name)
        self._waiting[key] = self._waiting.get(key, 0) + 1
        waiting = True
        try:
            async with self._lock(key):
                self._waiting[key] = self._waiting.get(key, 1) - 1
                waiting = False
                started = time.perf_counter()
                try:
                    return await self._reconcile(namespace, name)
                except Exception:
                    metrics.RECONCILE_ERRORS.inc()
                    raise
                finally:
                    metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)
        finally:
            if waiting:
                self._waiting[key] = self._waiting.get(key, 1) - 1

    async def nudge(self, namespace: str, name: str) -> None:
        """Reconcile because something changed; a run already waiting covers this one too."""
        if self._waiting.get((namespace, name)):
            return
        try:
            await self.reconcile(namespace, name)
        except kube.ApiError as exc:
            logger.warning("Reconciling %s/%s failed (will retry): %s", namespace, name, exc)

    async def _reconcile(self, namespace: str, name: str) -> dict[str, Any] | None:
        training = await self.kube.get(training_path(namespace, name))
        if training is None:
            self.tracker.forget(namespace, name)
            return None
        if (training.get("metadata") or {}).get("deletionTimestamp"):
            return None
        selector = f"{manifests.LABEL_TRAINING}={manifests.label_value(name)}"
        jobs, pods = await asyncio.gather(
            self.kube.list(jobs_path(namespace), selector),
            self.kube.list(core_path("pods", namespace), selector),
        )
        now = progress.now_iso()
        plan = progress.plan(training, jobs, pods, now=now, config=self.config)
        generation = (training.get("metadata") or {}).get("generation")
        status = plan.status
        failure: kube.ApiError | None = None
        try:
            if plan.create_step and plan.spec is not None:
                await self._start_step(training, plan.spec, plan.create_step)
            for job, suspend in plan.suspend_jobs.items():
                await self._set_suspended(namespace, job, suspend)
        except kube.ApiError as exc:
            if plan.create_step and exc.status in (400, 422):
                status = progress.rejected(status, plan.create_step, exc.message, now, generation)
            else:
                failure = exc
                what = (f"create the Job of step {plan.create_step}" if plan.create_step
                        else "update the step's Job")
                status = progress.with_problem(
                    status, "ApiError", f"Cannot {what} ({exc}); retrying", now, generation)
        await self._report(training, status)
        if failure is not None:
            raise failure
        return status

    async def _start_step(self, training: Mapping[str, Any], spec: ChatbotTrainingSpec,
                          step: str) -> None:
        namespace = training["metadata"]["namespace"]
        pvc = manifests.workspace_pvc(training, spec)
        if pvc is not None:
            await self.kube.create(core_path("persistentvolumeclaims", namespace), pvc)
        await self._ensure_config_map(training, spec)
        job = manifests.step_job(training, spec, step, self.config)
        if await self.kube.create(jobs_path(namespace), job):
            kopf.info(training, reason="StepStarted",
                      message=f"Started step {step}: Job {job['metadata']['name']}")

    async def _ensure_config_map(self, training: Mapping[str, Any],
                                 spec: ChatbotTrainingSpec) -> None:
        """Create the ConfigMap, or refresh its data (mutable spec fields changed)."""
        namespace = training["metadata"]["namespace"]
        wanted = manifests.config_map(training, spec)
        if await self.kube.create(core_path("configmaps", namespace), wanted):
            return
        url = core_path("configmaps", namespace, wanted["metadata"]["name"])
        existing = await self.kube.get(url)
        if existing is not None and existing.get("data") != wanted["data"]:
            await self.kube.patch(url, {"data": wanted["data"]})

    async def _set_suspended(self, namespace: str, job: str, suspend: bool) -> None:
        annotation = "true" if suspend else None
        await self.kube.patch(jobs_path(namespace, job), {
            "metadata": {"annotations": {manifests.ANNOTATION_SUSPENDED: annotation}},
            "spec": {"suspend": suspend},
        })

    async def _report(self, training: Mapping[str, Any], status: dict[str, Any]) -> None:
        meta = training["metadata"]
        old = training.get("status") or {}
        patch = progress.status_patch(old, status)
        if patch:
            await self.kube.patch(training_path(meta["namespace"], meta["name"], "status"),
                                  {"status": patch})
        for event in progress.transition_events(old, status):
            kopf.event(training, type=event.type, reason=event.reason, message=event.message)
        self.tracker.record(meta["namespace"], meta["name"], old, status)
