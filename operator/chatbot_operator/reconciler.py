"""One reconciliation of a ChatbotTraining: read, plan (pure, `planner.plan`), act, report.

Every trigger (an event of the training, of its Jobs or of its Pods, the periodic re-check)
ends in the same idempotent `reconcile()`. Calls for one training are serialized by a lock,
and bursts of triggers collapse into at most one queued run. The Jobs have deterministic
names, so a concurrent or repeated create gets 409 Conflict, which counts as done.

A training that no operator has reconciled yet (no status) gets its first step's Job
without any read first: nothing of it can exist (a 409 on its Job says otherwise, and the
usual reads follow); its status patch waits until Kopf has put its finalizer on
(`report_held`), so that neither patch makes the other fail. Writes are what a burst of new
trainings waits for on a real API server: one status patch per reconciliation at most, and a
later step reads its ConfigMap rather than trying to create it again. Work is skipped where
it cannot change anything:
- an event that brings nothing new: the training's generation (its spec) as last reconciled,
  or a Job or Pod at the resourceVersion the last reconciliation read or wrote (e.g. the
  ADDED event of the Job it just created, or the MODIFIED event of its own status patch);
- the periodic re-check plans every training of a namespace from one shared listing of
  Jobs, Pods and Events (at most SNAPSHOT_SECONDS old) and reconciles, with fresh reads,
  only the trainings where that finds something to do or to report.
An API error schedules another try with exponential backoff.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import kopf

from chatbot_api import serve as serve_api
from chatbot_api.spec import GROUP, PLURAL, VERSION, ChatbotTrainingSpec

from chatbot_operator import kube, live_progress, manifests, metrics, multinode, planner, serving, status_builder
from chatbot_operator.live_progress_poller import ProgressPoller
from chatbot_operator.observe import now_iso
from chatbot_operator.settings import OperatorConfig

logger = logging.getLogger(__name__)

SNAPSHOT_SECONDS = 2.0  # how old the re-check's shared listing of a namespace may be
HOLD_SECONDS = 5.0  # how long a new training's first status patch may wait (report_held)
FAILED_CREATE = "reason=FailedCreate,involvedObject.kind=Job"


def training_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    return kube.path(GROUP, VERSION, PLURAL, namespace, name, subresource)


def jobs_path(namespace: str, name: str | None = None) -> str:
    return kube.path("batch", "v1", "jobs", namespace, name)


def core_path(plural: str, namespace: str, name: str | None = None) -> str:
    return kube.path("", "v1", plural, namespace, name)


def retry_delay(attempt: int) -> float:
    return float(min(60, 2 ** min(attempt, 6)))


@dataclasses.dataclass
class Seen:
    """What the last reconciliation of a training read and wrote."""

    uid: str | None = None
    generation: int | None = None
    versions: dict[str, str] = dataclasses.field(default_factory=dict)  # child uid → resourceVersion
    status: dict[str, Any] | None = None  # as written (the operator is its only writer)

    def add(self, objects: Iterable[Mapping[str, Any]]) -> None:
        for obj in objects:
            meta = obj.get("metadata") or {}
            if meta.get("uid") and meta.get("resourceVersion"):
                self.versions[meta["uid"]] = meta["resourceVersion"]


@dataclasses.dataclass
class Snapshot:
    """A namespace's step Jobs and Pods (by training label) and the Jobs' FailedCreate Events."""

    taken: float
    jobs: dict[str, list]
    pods: dict[str, list]
    events: list


def _by_training(objects: Iterable[Mapping[str, Any]]) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for obj in objects:
        label = ((obj.get("metadata") or {}).get("labels") or {}).get(manifests.LABEL_TRAINING)
        grouped.setdefault(label, []).append(obj)
    return grouped


class ObjectError(Exception):
    """The API server refused an object a step needs."""

    def __init__(self, what: str, error: kube.ApiError) -> None:
        super().__init__(f"{what}: {error}")
        self.what = what
        self.error = error


class Reconciler:
    def __init__(self, client: kube.KubeClient, config: OperatorConfig,
                 tracker: metrics.TrainingTracker | None = None) -> None:
        self.kube = client
        self.config = config
        self.tracker = tracker or metrics.TrainingTracker()
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._waiting: dict[tuple[str, str], int] = {}  # calls waiting for the lock
        # Nudges folded into a call already waiting: their `unless` tests (None: always run).
        # The waiting call skips only when every one of them says the change was seen.
        self._folded: dict[tuple[str, str], list[Callable[[Seen], bool] | None]] = {}
        self._seen: dict[tuple[str, str], Seen] = {}
        self._attempts: dict[tuple[str, str], int] = {}  # failed tries in a row
        self._held: dict[tuple[str, str], dict[str, Any]] = {}  # status patches: report_held
        self._snapshots: dict[str, Snapshot] = {}
        self._snapshot_locks: dict[str, asyncio.Lock] = {}
        self._later: set[asyncio.TimerHandle | asyncio.Task] = set()
        self.live_progress = ProgressPoller(self.update_status, config)

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        """The training is gone: drop its lock, what was seen of it and its metrics."""
        key = (namespace, name)
        for table in (self._locks, self._waiting, self._folded, self._seen, self._attempts, self._held):
            table.pop(key, None)
        self.tracker.forget(namespace, name)
        self.live_progress.forget(namespace, name)

    def close(self) -> None:
        """Cancel the retries still scheduled (the operator stops)."""
        for item in self._later:
            item.cancel()
        self._later.clear()
        self.live_progress.close()

    # ------------------------------------------------------------------ triggers

    async def reconcile(self, namespace: str, name: str, *,
                        unless: Callable[[Seen], bool] | None = None,
                        fresh: Mapping[str, Any] | None = None,
                        report_later: bool = False) -> dict[str, Any] | None:
        """Bring one training a step further; returns its new status (None if it is gone or
        `unless` says the last reconciliation already saw what triggered this one). `fresh`:
        the training's body as just watched, if it has no status yet; `report_later`: hold
        back the status patch (see `report_held`)."""
        key = (namespace, name)
        self._waiting[key] = self._waiting.get(key, 0) + 1
        waiting = True
        try:
            async with self._lock(key):
                self._waiting[key] = self._waiting.get(key, 1) - 1
                waiting = False
                tests = [unless, *self._folded.pop(key, [])]
                seen = self._seen.get(key)
                if seen is not None and all(test is not None and test(seen) for test in tests):
                    return None
                started = time.perf_counter()
                try:
                    return await self._reconcile(namespace, name, fresh, report_later)
                except Exception:
                    metrics.RECONCILE_ERRORS.inc()
                    raise
                finally:
                    metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)
        finally:
            if waiting:
                self._waiting[key] = self._waiting.get(key, 1) - 1

    async def nudge(self, namespace: str, name: str, *,
                    unless: Callable[[Seen], bool] | None = None,
                    fresh: Mapping[str, Any] | None = None,
                    report_later: bool = False) -> None:
        """Reconcile because something changed; a run already waiting covers this one too
        (it runs unless every change folded into it was already seen). An API error is logged
        and tried again later."""
        key = (namespace, name)
        if self._waiting.get(key):
            self._folded.setdefault(key, []).append(unless)
            return
        try:
            await self.reconcile(namespace, name, unless=unless, fresh=fresh,
                                 report_later=report_later)
        except kube.ApiError as exc:
            if exc.reason == "ClientClosed":
                return
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            delay = retry_delay(attempt)
            logger.warning("[%s/%s] Reconciling failed, trying again in %.0f s: %s",
                           namespace, name, delay, exc)
            self._call_later(delay, lambda: self.nudge(namespace, name))
        else:
            self._attempts.pop(key, None)

    def _call_later(self, delay: float, make: Callable[[], Any]) -> None:
        def start() -> None:
            self._later.discard(handle)
            task = asyncio.ensure_future(make())
            self._later.add(task)
            task.add_done_callback(self._later.discard)

        handle = asyncio.get_running_loop().call_later(delay, start)
        self._later.add(handle)

    async def recheck(self, namespace: str, name: str, training: Mapping[str, Any]) -> None:
        """The periodic safety check of one unfinished training (`training`: its body as last
        watched): plan from the namespace's shared snapshot; reconcile only where that plan
        would act or change the status."""
        snapshot = await self._snapshot(namespace)
        seen = self._seen.get((namespace, name))
        if seen is not None and seen.uid == (training.get("metadata") or {}).get("uid"):
            # The watched body may lag behind the status this operator wrote last.
            training = {**training, "status": seen.status}
        label = manifests.label_value(name)
        plan = planner.plan(training, snapshot.jobs.get(label, []), snapshot.pods.get(label, []),
                             now=now_iso(), config=self.config, events=snapshot.events)
        if (plan.create_step or plan.suspend_jobs
                or status_builder.status_patch(training.get("status") or {}, plan.status)):
            await self.reconcile(namespace, name)

    async def _snapshot(self, namespace: str) -> Snapshot:
        async with self._snapshot_locks.setdefault(namespace, asyncio.Lock()):
            snapshot = self._snapshots.get(namespace)
            if snapshot is not None and time.monotonic() - snapshot.taken < SNAPSHOT_SECONDS:
                return snapshot
            taken = time.monotonic()
            jobs, pods, events = await kube.gather(
                self.kube.list(jobs_path(namespace), manifests.LABEL_TRAINING),
                self.kube.list(core_path("pods", namespace), manifests.LABEL_TRAINING),
                self.kube.list(core_path("events", namespace), field_selector=FAILED_CREATE),
            )
            snapshot = Snapshot(taken, _by_training(jobs), _by_training(pods), events)
            self._snapshots[namespace] = snapshot
            return snapshot

    # ------------------------------------------------------------------ one reconciliation

    async def _reconcile(self, namespace: str, name: str,
                         fresh: Mapping[str, Any] | None = None,
                         report_later: bool = False) -> dict[str, Any] | None:
        now = now_iso()
        if fresh is not None:
            status = await self._start_fresh(fresh, now, report_later)
            if status is not None:
                return status
        training = await self.kube.get(training_path(namespace, name))
        if training is None:
            self.forget(namespace, name)
            return None
        if (training.get("metadata") or {}).get("deletionTimestamp"):
            return None
        selector = f"{manifests.LABEL_TRAINING}={manifests.label_value(name)}"
        jobs, pods = await kube.gather(
            self.kube.list(jobs_path(namespace), selector),
            self.kube.list(core_path("pods", namespace), selector),
        )
        plan = planner.plan(training, jobs, pods, now=now, config=self.config)
        if plan.events_of_job is not None:  # a Job without pods: ask its Events why
            job_meta = plan.events_of_job.get("metadata") or {}
            events = await self.kube.list(
                core_path("events", namespace),
                field_selector=f"{FAILED_CREATE},involvedObject.name={job_meta.get('name')}")
            plan = planner.plan(training, jobs, pods, now=now, config=self.config, events=events)
        return await self._act(training, plan, jobs, pods, now, report_later=report_later)

    async def _start_fresh(self, training: Mapping[str, Any], now: str,
                           report_later: bool = False) -> dict[str, Any] | None:
        """A training no operator has reconciled yet (no status; its body as just watched):
        nothing of it can exist, so its first step starts without reading anything first.
        None when that does not apply, or when its Job exists after all (then read).
        `report_later`: its status patch waits for `report_held` (see there)."""
        if training.get("status") or (training.get("metadata") or {}).get("deletionTimestamp"):
            return None
        plan = planner.plan(training, [], [], now=now, config=self.config, events=[])
        if not plan.create_step:
            return None
        return await self._act(training, plan, [], [], now, new_job_required=True,
                               report_later=report_later)

    async def _act(self, training: Mapping[str, Any], plan: planner.Plan, jobs: list, pods: list,
                   now: str, new_job_required: bool = False,
                   report_later: bool = False) -> dict[str, Any] | None:
        """Carry out a plan and report the status (one patch, or held back: `report_held`);
        remember what was read and written."""
        meta = training.get("metadata") or {}
        seen = Seen(uid=meta.get("uid"), generation=meta.get("generation"))
        seen.add(jobs + pods)
        status = plan.status
        failure: kube.ApiError | None = None
        try:
            if plan.create_step and plan.spec is not None:
                created = await self._start_step(training, plan.spec, plan.create_step,
                                                 plan.attempt, plan.retry_message,
                                                 first=not jobs)
                seen.add(created)
                new_jobs = [obj for obj in created if obj.get("kind") == "Job"]
                if new_job_required and not new_jobs:
                    return None
                if new_jobs:  # report what the next look would see: the step waits for a pod
                    status = planner.plan(training, jobs + new_jobs, pods, now=now,
                                           config=self.config, events=[]).status
            for job, suspend in plan.suspend_jobs.items():
                seen.add([await self._set_suspended(meta["namespace"], job, suspend)])
            if training.get("status"):
                status = await self._serve(training, plan.spec, status, now, seen)
        except ObjectError as exc:
            if plan.create_step and exc.error.status in (400, 422):
                status = status_builder.rejected(status, plan.create_step, exc.what, exc.error.message,
                                           now, meta.get("generation"))
            else:
                failure = exc.error
                status = status_builder.with_problem(
                    status, "ApiError", f"Cannot create or update {exc.what} ({exc.error}); "
                    f"retrying", now, meta.get("generation"))
        await self._report(training, status, hold=report_later and failure is None)
        if failure is not None:
            raise failure
        seen.status = status
        self._seen[(meta["namespace"], meta["name"])] = seen
        self.live_progress.watch(meta["namespace"], meta["name"], live_progress.target(status, pods))
        return status

    async def _create(self, namespace: str, plural: str, body: Mapping[str, Any]) -> dict | None:
        what = f"{body['kind']} {body['metadata']['name']}"
        url = jobs_path(namespace) if plural == "jobs" else core_path(plural, namespace)
        try:
            return await self.kube.create(url, body)
        except kube.ApiError as exc:
            raise ObjectError(what, exc) from exc

    async def _start_step(self, training: Mapping[str, Any], spec: ChatbotTrainingSpec,
                          step: str, attempt: int = 1, retry_message: str | None = None,
                          first: bool = True) -> list[dict]:
        """Create what the step needs (claim, ConfigMap, a multi-node train step's Service
        together), then its Job; returns what was created. `first`: no Job of the training
        exists yet. Once one does, the claim and the ConfigMap were created before it, so
        the claim is not created again and the ConfigMap is read (and refreshed) first."""
        namespace = training["metadata"]["namespace"]
        pvc = manifests.workspace_pvc(training, spec) if first else None
        *companions, job = multinode.step_objects(training, spec, step, self.config, attempt)
        needs = [self._ensure_config_map(training, spec, read_first=not first)]
        if pvc is not None:
            needs.append(self._create(namespace, "persistentvolumeclaims", pvc))
        needs += [self._create(namespace, "services", obj) for obj in companions]
        results = await asyncio.gather(*needs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        created = await self._create(namespace, "jobs", job)
        if created is not None:
            if retry_message:
                kopf.warn(training, reason="StepRetrying", message=retry_message)
            kopf.info(training, reason="StepStarted",
                      message=f"Started step {step}: Job {job['metadata']['name']}")
        return [obj for obj in results if isinstance(obj, dict)] + ([created] if created else [])

    async def _ensure_config_map(self, training: Mapping[str, Any], spec: ChatbotTrainingSpec,
                                 read_first: bool = False) -> dict | None:
        """Create the ConfigMap, or refresh its data (mutable spec fields changed).
        `read_first`: it is expected to exist, so read it rather than try a create (a write)
        that would be refused."""
        namespace = training["metadata"]["namespace"]
        wanted = manifests.config_map(training, spec)
        url = core_path("configmaps", namespace, wanted["metadata"]["name"])
        try:
            existing = await self.kube.get(url) if read_first else None
            if existing is None:
                created = await self._create(namespace, "configmaps", wanted)
                if created is not None:
                    return created
                existing = await self.kube.get(url)
            if existing is not None and existing.get("data") != wanted["data"]:
                await self.kube.patch(url, {"data": wanted["data"]})
        except kube.ApiError as exc:
            raise ObjectError(f"ConfigMap {wanted['metadata']['name']}", exc) from exc
        return None

    async def _serve(self, training: Mapping[str, Any], spec: ChatbotTrainingSpec | None,
                     status: dict[str, Any], now: str, seen: Seen) -> dict[str, Any]:
        """Keep the model's server as spec.serve says (serving.py); the status with
        status.serving and the Serving condition."""
        meta = training["metadata"]
        wanted = serving.plan(training, spec, status, self.config)
        if wanted is None:
            return serving.carried_over(training, status)
        namespace, server = meta["namespace"], serve_api.server_name(meta["name"])
        if wanted.remove:
            for url in (kube.path("apps", "v1", "deployments", namespace, server),
                        core_path("services", namespace, server)):
                try:
                    await self.kube.delete(url)
                except kube.ApiError as exc:
                    raise ObjectError(url.rsplit("/", 2)[-2] + f" {server}", exc) from exc
        found = None
        if wanted.deployment is not None:
            try:
                found = await self._ensure_server(namespace, wanted)
            except kube.ApiError as exc:
                if exc.status not in (400, 422):
                    raise ObjectError(f"the server {server}", exc) from exc
                wanted = serving.ServingPlan(not_serving=(
                    "ServerRejected", f"The API server rejected the server {server}: {exc.message}"))
            seen.add([found] if found else [])
        serving_status, condition = serving.serving_status(training, wanted, found)
        return serving.with_serving(status, serving_status, condition,
                                    (training.get("status") or {}).get("conditions"), now,
                                    meta.get("generation"))

    async def _ensure_server(self, namespace: str, wanted: serving.ServingPlan) -> dict | None:
        """Create the server's Deployment (or patch it to the spec) and its Service."""
        assert wanted.deployment is not None and wanted.service is not None
        url = kube.path("apps", "v1", "deployments", namespace)
        name = wanted.deployment["metadata"]["name"]
        found = await self.kube.get(f"{url}/{name}")
        if found is None:
            found = await self.kube.create(url, wanted.deployment) or await self.kube.get(
                f"{url}/{name}")
        else:
            patch = serving.deployment_patch(found, wanted.deployment)
            if patch is not None:
                found = await self.kube.patch(f"{url}/{name}", patch)
        await self.kube.create(core_path("services", namespace), wanted.service)
        return found

    async def _set_suspended(self, namespace: str, job: str, suspend: bool) -> dict:
        annotation = "true" if suspend else None
        try:
            return await self.kube.patch(jobs_path(namespace, job), {
                "metadata": {"annotations": {manifests.ANNOTATION_SUSPENDED: annotation}},
                "spec": {"suspend": suspend},
            })
        except kube.ApiError as exc:
            raise ObjectError(f"Job {job}", exc) from exc

    async def update_status(self, namespace: str, name: str,
                            change: Callable[[Mapping[str, Any]], dict[str, Any]]) -> None:
        """Apply `change` to the status this operator last wrote (under the training's
        lock) and patch what differs; nothing when it has not reconciled the training."""
        key = (namespace, name)
        if key not in self._seen:  # not reconciled (or forgotten): no lock to make
            return
        await self.report_held(namespace, name)  # first, or it would overwrite this change
        async with self._lock(key):
            seen = self._seen.get(key)
            if seen is None or seen.status is None:
                return
            new = change(seen.status)
            patch = status_builder.status_patch(seen.status, new)
            if patch:
                await self.kube.patch(training_path(namespace, name, "status"), {"status": patch})
            seen.status = new

    async def _report(self, training: Mapping[str, Any], status: dict[str, Any],
                      hold: bool = False) -> None:
        """One status patch: what differs from the status the training has (as read), which
        also covers a patch still held back. `hold`: hold this one back (`report_held`)."""
        meta = training["metadata"]
        key = (meta["namespace"], meta["name"])
        self._held.pop(key, None)
        old = training.get("status") or {}
        patch = status_builder.status_patch(old, status)
        if patch and hold:
            self._held[key] = patch
            self._call_later(HOLD_SECONDS, lambda: self.report_held(*key))
        elif patch:
            await self.kube.patch(training_path(*key, "status"), {"status": patch})
        for event in status_builder.transition_events(old, status):
            kopf.event(training, type=event.type, reason=event.reason, message=event.message)
        self.tracker.record(meta["namespace"], meta["name"], old, status)

    async def report_held(self, namespace: str, name: str) -> None:
        """Send the status patch held back while Kopf puts its finalizer on (`report_later`).

        Kopf adds its finalizer to an unfinished training after the handler of an event
        without it returns (a new training's first event, normally), with a JSON patch that
        tests the resourceVersion of that event's body. A status patch sent before it changes
        that resourceVersion: the finalizer patch fails, and Kopf sends it again for each
        event it then sees without the finalizer. So the status waits for the training's
        event that shows the finalizer (the handler calls this), or HOLD_SECONDS at most. A
        failed patch is not held again: what was seen of the training is forgotten, and the
        next try reads and reports in full."""
        key = (namespace, name)
        if key not in self._held:
            return
        async with self._lock(key):
            patch = self._held.pop(key, None)
            if patch is None:
                return
            try:
                await self.kube.patch(training_path(namespace, name, "status"), {"status": patch})
            except kube.ApiError as exc:
                self._seen.pop(key, None)
                if exc.reason == "ClientClosed" or exc.status == 404:
                    return
                logger.warning("[%s/%s] Reporting the status failed, trying again: %s",
                               namespace, name, exc)
                self._call_later(retry_delay(0), lambda: self.nudge(namespace, name))
