"""Support for the operator tests: a Kubernetes API emulator and the tests' cluster client.

`ClusterEmulator` extends kmock's `KubernetesEmulator` with what the operator and Kopf rely
on and kmock 0.8 does not model: uid/resourceVersion/generation/creationTimestamp,
generateName, watches that resume from a resourceVersion, label selectors, field selectors
on lists (e.g. Events by `involvedObject.name` and `reason`), the status subresource kept
apart from the rest of the object, JSON patches with a failing `test` answered by 422,
finalizers with deletionTimestamp, ownerReference garbage collection (background cascade),
Namespace objects served at /api/v1/namespaces, Kopf's peering resources, and typed lists.

What it does not model (covered elsewhere or by design): schema validation, defaulting and
CEL rules of the CRD (tests/unit/test_crd.py validates against the schema and the rules'
Python twins); admission, quotas and RBAC enforcement (tests refuse requests through
`ClusterEmulator.admission`, and check every operator request against RBAC_RULES); the
Job and Pod controllers, scheduler and kubelet (tests play their part with `Cluster`: they
create Pods with container states and termination messages, set Job conditions in the
order the Job controller does (`FailureTarget` before the final failed count and `Failed`),
and post the `FailedCreate` Event the Job controller records when admission refuses a Job's
pod, its only trace: the Job's status does not change); strategic merge
patch (treated as a JSON merge patch); watch bookmarks and event history older than the
watch (a watch resuming from a resourceVersion gets the objects changed since, as ADDED).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import random
import re
import string
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import attrs
import jsonpatch
import kmock
from kmock._internal import dicts as kmock_dicts
from kmock._internal import enums as kmock_enums
from kmock._internal import parsing as kmock_parsing

from chatbot_api.crd import build_crd
from chatbot_api.spec import GROUP, KIND, PLURAL, VERSION

NAMESPACE = "ml"
TRAININGS = f"{GROUP}/{VERSION}/{PLURAL}"
JOBS = "batch/v1/jobs"
PODS = "v1/pods"
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]

# (resource, kind, namespaced, subresources)
BUILTIN_RESOURCES = [
    (TRAININGS, KIND, True, {"status"}),
    (JOBS, "Job", True, {"status"}),
    (PODS, "Pod", True, {"status"}),
    ("v1/persistentvolumeclaims", "PersistentVolumeClaim", True, {"status"}),
    ("v1/configmaps", "ConfigMap", True, set()),
    ("v1/services", "Service", True, {"status"}),
    ("v1/events", "Event", True, set()),
    ("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", False, set()),
    ("kopf.dev/v1/kopfpeerings", "KopfPeering", True, set()),
    ("v1/namespaces", "Namespace", False, {"status"}),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False,
     {"status"}),
]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------- label selectors

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def selector_matches(selector: str | None, labels: Mapping[str, str] | None) -> bool:
    """Equality (=, ==, !=), set (in, notin) and existence (k, !k) requirements."""
    labels = labels or {}
    for term in _split_selector(selector or ""):
        if match := _SET_RE.match(term):
            key, op, values = match.groups()
            options = {v.strip() for v in values.split(",")}
            if (op == "in") != (labels.get(key) in options):
                return False
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field(obj: Mapping[str, Any], path: str) -> str:
    for key in path.split("."):
        obj = obj.get(key) if isinstance(obj, Mapping) else None
    return "" if obj is None else str(obj)


def field_selector_matches(selector: str | None, obj: Mapping[str, Any]) -> bool:
    """Field selectors as the API server applies them: `path=value`, `==` and `!=`."""
    for term in (t.strip() for t in (selector or "").split(",") if t.strip()):
        if "!=" in term:
            path, value = term.split("!=", 1)
            if _field(obj, path.strip()) == value.strip():
                return False
        else:
            path, value = term.replace("==", "=").split("=", 1)
            if _field(obj, path.strip()) != value.strip():
                return False
    return True


# ------------------------------------------------------------------------- the emulator


def _parse_path(path: str) -> kmock_parsing.ParsedPath:
    """kmock's parser, plus cluster-scoped `/api/v1/namespaces[/<name>[/status]]`."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        return kmock_parsing.ParsedPath(
            group="", version="v1", plural="namespaces",
            name=parts[3] if len(parts) > 3 else None,
            subresource=parts[4] if len(parts) > 4 else None,
        )
    return _ORIGINAL_PARSE_PATH(path)


_ORIGINAL_PARSE_PATH = kmock_parsing.parse_path


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the object semantics of a real API server (see module doc)."""

    _revisions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _revision: int = attrs.field(default=0, init=False)
    _results: dict = attrs.field(factory=dict, init=False)
    # Admission: callables that may raise `error(...)` to refuse a create/update request.
    admission: list = attrs.field(factory=list, init=False)

    # ----------------------------------------------------------------- registration

    def register_builtins(self) -> None:
        for resource, kind, namespaced, subresources in BUILTIN_RESOURCES:
            self.resources[resource] = kmock.ResourceInfo(
                kind=kind, singular=kind.lower(), namespaced=namespaced, verbs=set(VERBS),
                subresources=subresources,
            )
        for namespace in ("default", NAMESPACE, "other"):
            self._store(kmock.resource("v1/namespaces"), None, namespace,
                        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        crd = build_crd()
        self._store(kmock.resource("apiextensions.k8s.io/v1/customresourcedefinitions"), None,
                    crd["metadata"]["name"], crd)

    def _store(self, resource: Any, namespace: str | None, name: str, body: dict) -> dict:
        body = copy.deepcopy(body)
        self._stamp_new(body)
        self._objects[resource, namespace, name] = body
        return body

    # ----------------------------------------------------------------- helpers

    def _next_rv(self) -> str:
        self._revision = next(self._revisions)
        return str(self._revision)

    def _stamp_new(self, body: dict) -> None:
        meta = body.setdefault("metadata", {})
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self._next_rv()
        meta["generation"] = 1
        meta["creationTimestamp"] = _now()

    def _has_status(self, resource: Any) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    def _live(self, resource: Any, namespace: str | None = None) -> list[tuple[tuple, dict]]:
        result = []
        for key, obj in self._objects.items():
            res, ns, _ = key
            if res == resource and not obj.deleted and (namespace is None or ns == namespace):
                result.append((key, obj.raw))
        return result

    @property
    def requests(self) -> list:
        """All requests served so far (kmock keeps them; iterating the handler yields them)."""
        return list(self._requests)

    def count(self, method: str, resource: str, subresource: str | None = None) -> int:
        """How many requests of this method were made for a resource (for assertions)."""
        wanted = kmock.resource(resource)
        return sum(1 for r in self.requests
                   if r.method.value.upper() == method.upper() and r.resource == wanted
                   and r.subresource == subresource)

    # ----------------------------------------------------------------- mutations

    @staticmethod
    def error(status: int, reason: str, message: str) -> kmock.KubernetesError:
        return kmock.KubernetesError(status=status, reason=reason, message=message,
                                     details={"message": message})

    async def _handle(self, request: kmock.Request) -> Any:
        action = request.action
        if request.resource is not None and action in (
            kmock_enums.action.CREATE, kmock_enums.action.UPDATE, kmock_enums.action.DELETE
        ):
            if action != kmock_enums.action.DELETE:
                for check in self.admission:
                    check(request)
            async with self._lock:
                if action == kmock_enums.action.CREATE:
                    self._results[id(request)] = await self._create(request)
                elif action == kmock_enums.action.UPDATE:
                    self._results[id(request)] = await self._update(request)
                elif request.name is not None:
                    self._results[id(request)] = await self._delete(
                        request.resource, request.namespace, request.name)
        # Skip KubernetesEmulator._handle (its own, simpler mutations); serve the response.
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    async def _emit(self, resource: Any, kind: str, body: dict) -> None:
        await self._buses[resource].put({"type": kind, "object": copy.deepcopy(body)})

    async def _create(self, request: kmock.Request) -> dict:
        if not isinstance(request.data, dict):
            raise self.error(400, "BadRequest", "the body must be a JSON object")
        body = copy.deepcopy(request.data)
        meta = body.setdefault("metadata", {})
        info = self.resources[request.resource] if request.resource in self.resources else None
        namespaced = info is None or info.namespaced is not False
        namespace = (request.namespace or meta.get("namespace")) if namespaced else None
        if namespace:
            meta["namespace"] = namespace
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise self.error(422, "Invalid", "metadata.name or generateName is required")
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta["name"] = meta["generateName"] + suffix
        key = (request.resource, namespace, meta["name"])
        if key in self._objects and not self._objects[key].deleted:
            raise self.error(409, "AlreadyExists",
                              f'{request.resource.plural} "{meta["name"]}" already exists')
        self._stamp_new(body)
        if key in self._objects:
            self._objects[key].create(body)
        else:
            self._objects[key] = body
        await self._emit(request.resource, "ADDED", body)
        return body

    async def _update(self, request: kmock.Request) -> dict:
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            raise self.error(404, "NotFound", f'{request.resource.plural} "{request.name}" not found')
        current = copy.deepcopy(self._objects[key].raw)
        data = request.data
        status_only = request.subresource == "status"
        if isinstance(data, list):  # JSON patch (RFC 6902), as Kopf uses for finalizers
            try:
                new = jsonpatch.apply_patch(current, data, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise self.error(422, "Invalid", f"the JSON patch failed: {exc}") from None
        elif isinstance(data, dict):  # merge patch; strategic merge is treated alike
            data = copy.deepcopy(data)
            if status_only:
                data = {"status": data.get("status")} if "status" in data else {}
            elif self._has_status(request.resource):
                data.pop("status", None)
            new = dict(kmock_dicts.merge_patch_dict(current, data))
        else:
            raise self.error(400, "BadRequest", "unsupported patch body")
        if status_only:
            new = {**current, "status": new.get("status")}
        elif self._has_status(request.resource):
            new["status"] = current.get("status")
        if new.get("status") is None:
            new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for field in ("uid", "name", "namespace", "creationTimestamp", "deletionTimestamp"):
            if field in current.get("metadata", {}):
                meta[field] = current["metadata"][field]
        if new.get("spec") != current.get("spec"):
            meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
        meta["resourceVersion"] = self._next_rv()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._objects[key].history.append(new)
            self._objects[key].delete()
            await self._emit(request.resource, "DELETED", new)
            await self._collect_garbage(meta["uid"])
            return new
        self._objects[key].history.append(new)
        await self._emit(request.resource, "MODIFIED", new)
        return new

    async def _delete(self, resource: Any, namespace: str | None, name: str) -> dict:
        key = (resource, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            raise self.error(404, "NotFound", f'{resource.plural} "{name}" not found')
        current = copy.deepcopy(self._objects[key].raw)
        meta = current["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = _now()
                meta["deletionGracePeriodSeconds"] = 0
                meta["resourceVersion"] = self._next_rv()
                self._objects[key].history.append(current)
                await self._emit(resource, "MODIFIED", current)
            return current
        meta["resourceVersion"] = self._next_rv()
        self._objects[key].history.append(current)
        self._objects[key].delete()
        await self._emit(resource, "DELETED", current)
        await self._collect_garbage(meta["uid"])
        return current

    async def _collect_garbage(self, owner_uid: str) -> None:
        """Background cascading deletion: delete every object owned by `owner_uid`."""
        for (resource, namespace, name), obj in list(self._objects.items()):
            if obj.deleted:
                continue
            owners = obj.raw.get("metadata", {}).get("ownerReferences") or []
            if any(owner.get("uid") == owner_uid for owner in owners):
                await self._delete(resource, namespace, name)

    # ----------------------------------------------------------------- reads

    def _known(self, resource: Any) -> bool:
        return resource in self.resources or any(k[0] == resource for k in self._objects)

    def _typed(self, resource: Any, body: dict) -> dict:
        info = self.resources[resource] if resource in self.resources else None
        if info is not None and info.kind:
            group_version = (f"{resource.group}/{resource.version}" if resource.group
                             else resource.version)
            body = {"apiVersion": group_version, "kind": info.kind, **body}
        return body

    async def _serve_list(self, request: kmock.Request) -> Any:
        if not self._known(request.resource):
            raise self.error(404, "NotFound", "the server could not find the requested resource")
        selector = request.params.get("labelSelector")
        fields = request.params.get("fieldSelector")
        async with self._lock:
            items = [self._typed(request.resource, copy.deepcopy(body))
                     for _, body in self._live(request.resource, request.namespace)
                     if selector_matches(selector, body.get("metadata", {}).get("labels"))
                     and field_selector_matches(fields, body)]
            revision = str(self._revision)
        info = self.resources[request.resource] if request.resource in self.resources else None
        kind = f"{info.kind}List" if info is not None and info.kind else "List"
        return {"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": revision},
                "items": items}

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        async with self._lock:
            key = (request.resource, request.namespace, request.name)
            if key not in self._objects or self._objects[key].deleted:
                raise self.error(404, "NotFound", f'"{request.name}" not found')
            return self._typed(request.resource, copy.deepcopy(self._objects[key].raw))

    async def _serve_create(self, request: kmock.Request) -> Any:
        return self._results.pop(id(request))

    _serve_update = _serve_create
    _serve_delete = _serve_create

    async def _serve_watch(self, request: kmock.Request) -> Any:
        yield b""
        selector = request.params.get("labelSelector")
        since = request.params.get("resourceVersion")
        since_rv = int(since) if since and since.isdigit() else 0
        namespace = request.namespace
        bus = self._buses[request.resource]
        async with self._lock:
            initial = [{"type": "ADDED", "object": copy.deepcopy(body)}
                       for _, body in self._live(request.resource, namespace)
                       if int(body["metadata"].get("resourceVersion", 0)) > since_rv
                       and selector_matches(selector, body["metadata"].get("labels"))]
            marker = await bus.mark()
        try:
            for event in initial:
                yield event
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                if namespace is not None and meta.get("namespace") != namespace:
                    continue
                if int(meta.get("resourceVersion", 0)) <= since_rv:
                    continue
                if selector_matches(selector, meta.get("labels")):
                    yield event
        finally:
            await bus.unmark(marker)


# ------------------------------------------------------------------------- test API client


class Cluster:
    """What the tests do to the emulated cluster: play the user, Job controller and kubelet."""

    def __init__(self, emulator: ClusterEmulator, session: aiohttp.ClientSession) -> None:
        self.emulator = emulator
        self.session = session

    # --------------------------------------------------------------- raw HTTP

    async def call(self, method: str, path: str, body: Any = None,
                   content_type: str = "application/merge-patch+json") -> Any:
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self.session.request(method, path, json=body, headers=headers) as response:
            payload = await response.json(content_type=None)
            if response.status >= 400:
                raise AssertionError(f"{method} {path} -> {response.status}: {payload}")
            return payload

    # --------------------------------------------------------------- objects

    def get(self, resource: str, name: str, namespace: str | None = NAMESPACE) -> dict | None:
        key = (kmock.resource(resource), namespace, name)
        objects = self.emulator.objects
        if key not in objects or objects[key].deleted:
            return None
        return copy.deepcopy(objects[key].raw)

    def list(self, resource: str, namespace: str | None = NAMESPACE) -> list[dict]:
        res = kmock.resource(resource)
        return [copy.deepcopy(obj.raw) for (r, ns, _), obj in self.emulator.objects.items()
                if r == res and not obj.deleted and (namespace is None or ns == namespace)]

    def training(self, name: str) -> dict | None:
        return self.get(TRAININGS, name)

    def status(self, name: str) -> dict:
        return (self.training(name) or {}).get("status") or {}

    def job(self, name: str, step: str) -> dict | None:
        from chatbot_operator.manifests import job_name
        return self.get(JOBS, job_name(name, step))

    def events(self, name: str) -> list[dict]:
        return [e for e in self.list("v1/events")
                if e.get("involvedObject", {}).get("name") == name]

    async def apply_training(self, name: str, spec: Mapping[str, Any],
                             namespace: str = NAMESPACE) -> dict:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                "metadata": {"name": name, "namespace": namespace}, "spec": dict(spec)}
        return await self.call("POST", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}",
                               body, "application/json")

    async def patch_training(self, name: str, patch: Mapping[str, Any],
                             namespace: str = NAMESPACE) -> dict:
        return await self.call(
            "PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}", patch)

    async def delete_training(self, name: str, namespace: str = NAMESPACE) -> dict:
        return await self.call(
            "DELETE", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}")

    # --------------------------------------------------------------- the Job controller's part

    async def run_pod(self, job: Mapping[str, Any], *, phase: str = "Running",
                      state: Mapping[str, Any] | None = None,
                      conditions: list | None = None, suffix: str | None = None) -> dict:
        """Create a pod of `job` the way the Job controller would, with the given status."""
        meta = job["metadata"]
        template = job["spec"]["template"]
        labels = {**template["metadata"]["labels"],
                  "batch.kubernetes.io/job-name": meta["name"], "job-name": meta["name"],
                  "batch.kubernetes.io/controller-uid": meta["uid"],
                  "controller-uid": meta["uid"]}
        name = f"{meta['name']}-{suffix or ''.join(random.choices(string.ascii_lowercase, k=5))}"
        container = template["spec"]["containers"][0]
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": meta["namespace"], "labels": labels,
                         "annotations": dict(template["metadata"].get("annotations") or {}),
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                              "name": meta["name"], "uid": meta["uid"],
                                              "controller": True, "blockOwnerDeletion": True}]},
            "spec": template["spec"],
        }
        await self.call("POST", f"/api/v1/namespaces/{meta['namespace']}/pods", pod,
                        "application/json")
        status: dict[str, Any] = {"phase": phase}
        if state is not None:
            status["containerStatuses"] = [{"name": container["name"], "image": container["image"],
                                            "ready": False, "restartCount": 0, "state": dict(state)}]
        if conditions is not None:
            status["conditions"] = conditions
        return await self.call("PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{name}/status",
                               {"status": status})

    async def set_job_status(self, job: Mapping[str, Any], status: Mapping[str, Any]) -> dict:
        meta = job["metadata"]
        return await self.call(
            "PATCH", f"/apis/batch/v1/namespaces/{meta['namespace']}/jobs/{meta['name']}/status",
            {"status": dict(status)})

    async def succeed(self, job: Mapping[str, Any], summary: Mapping[str, Any] | None = None) -> None:
        """The step's pod exits 0 with the trainer's termination message; the Job completes."""
        step = job["metadata"]["labels"]["chatbot.dev/step"]
        message = json.dumps({"step": step, "ok": True, "summary": dict(summary or {})})
        now = _now()
        await self.run_pod(job, phase="Succeeded", state={"terminated": {
            "exitCode": 0, "reason": "Completed", "message": message,
            "startedAt": now, "finishedAt": now}})
        await self.set_job_status(job, {
            "startTime": now, "completionTime": now, "succeeded": 1, "active": 0,
            "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now},
                {"type": "Complete", "status": "True", "lastTransitionTime": now}]})

    async def fail(self, job: Mapping[str, Any], *, reason: str, message: str = "",
                   terminated: Mapping[str, Any] | None = None, failed: int = 1) -> None:
        """The step's pod terminates with `terminated`; the Job fails with `reason`."""
        now = _now()
        if terminated is not None:
            await self.run_pod(job, phase="Failed", state={"terminated": {
                "startedAt": now, "finishedAt": now, **terminated}})
        await self.mark_failing(job, reason=reason, message=message, failed=failed)
        await self.mark_failed(job, reason=reason, message=message, failed=failed)

    async def mark_failing(self, job: Mapping[str, Any], *, reason: str, message: str = "",
                           failed: int = 0) -> None:
        """The Job controller's first status update of a failing Job: the `FailureTarget`
        condition, while `failed` may not count the last failed pod yet."""
        now = _now()
        await self.set_job_status(job, {
            "startTime": now, "failed": failed, "active": 0,
            "conditions": [{"type": "FailureTarget", "status": "True", "reason": reason,
                            "message": message, "lastTransitionTime": now}]})

    async def mark_failed(self, job: Mapping[str, Any], *, reason: str, message: str = "",
                          failed: int = 1) -> None:
        """The Job controller's last status update of a failed Job: the final count and the
        terminal `Failed` condition (after `FailureTarget`)."""
        now = _now()
        await self.set_job_status(job, {
            "startTime": now, "failed": failed, "active": 0,
            "conditions": [
                {"type": "FailureTarget", "status": "True", "reason": reason,
                 "message": message, "lastTransitionTime": now},
                {"type": "Failed", "status": "True", "reason": reason, "message": message,
                 "lastTransitionTime": now}]})

    async def refuse_pods(self, job: Mapping[str, Any], refusal: str, count: int = 1) -> None:
        """Admission refuses the Job's pod (quota, missing PriorityClass, ...): the Job
        controller records a `FailedCreate` Warning Event on the Job, `count` times in one
        Event, and changes nothing else."""
        meta = job["metadata"]
        now = _now()
        await self.call("POST", f"/api/v1/namespaces/{meta['namespace']}/events", {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}",
                         "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"],
                               "resourceVersion": meta["resourceVersion"]},
            "reason": "FailedCreate", "type": "Warning",
            "message": f"Error creating: {refusal}",
            "source": {"component": "job-controller"}, "reportingComponent": "job-controller",
            "count": count, "firstTimestamp": now, "lastTimestamp": now,
        }, "application/json")


def operator_requests(cluster: Cluster) -> list:
    """Requests made by the operator (Kopf's and its own client), not by the tests."""
    return [r for r in cluster.emulator.requests
            if r.headers.get("User-Agent", "").startswith(("kopf/", "chatbot-operator"))]


def rbac_verb(request: kmock.Request) -> str:
    method = request.method.value.upper()
    if method == "GET":
        if request.params.get("watch") == "true":
            return "watch"
        return "get" if request.name else "list"
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]


def assert_rbac_allows_operator_requests(cluster: Cluster) -> None:
    from chatbot_operator.rbac import allows
    denied = set()
    seen = set()
    for request in operator_requests(cluster):
        if request.resource is None or request.resource.plural is None:
            continue  # API discovery: allowed to every authenticated client
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        seen.add((request.resource.group, resource, rbac_verb(request)))
        if not allows(request.resource.group, resource, rbac_verb(request)):
            denied.add((request.resource.group, resource, rbac_verb(request)))
    assert seen, "no operator requests were recorded"
    assert not denied, f"RBAC_RULES lack: {sorted(denied)}"


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0,
                   message: str = "condition") -> Any:
    """Poll until `predicate()` is truthy; return its value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.02)
