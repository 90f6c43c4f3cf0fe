"""Serving the exported model (spec.serve): pure builders and the serving part of the status.

Once a training has Succeeded (so every file is complete: the export step writes a file under
a temporary name and renames it when it is whole, and the run succeeds after that), with
`serve.enabled` the operator keeps two objects, both named `<name>-server`:
- a Deployment running llama.cpp's server (`llama-server`, OpenAI-compatible) on one exported
  GGUF file, read from its claim mounted read-only, with a startup and a readiness probe on
  /health (503 while the model loads, 200 once it answers);
- a ClusterIP Service on port 8080 in front of it.
Both carry a controller ownerReference to the training, so deleting it deletes them; turning
`serve.enabled` off deletes them. The Deployment's annotation `chatbot.dev/server-spec-hash`
tells whether it matches the spec; when not, it is patched (a rolling update).

`status.serving` says where the model is served (the Service, its URL, the file) and how many
pods are ready; the `Serving` condition says the same in one line, or why nothing is served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from chatbot_api.serve import SERVER_PORT, server_name, server_url
from chatbot_api.spec import GROUP, ChatbotTrainingSpec

from chatbot_operator import manifests
from chatbot_operator.settings import OperatorConfig

CONDITION = "Serving"
COMPONENT = "server"
CONTAINER = "server"
MODEL_DIR = "/models"
ANNOTATION_SPEC_HASH = f"{GROUP}/server-spec-hash"
HEALTH_PATH = "/health"
ALL_LAYERS = "999"  # -ngl: offload every layer to the GPU
# A Service name is a DNS-1035 label: it starts with a letter (it becomes a DNS name).
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Smallest first, for files whose size the export did not report.
BITS = {"q4_0": 4.5, "q4_k_m": 4.8, "q5_k_m": 5.7, "q6_k": 6.6, "q8_0": 8.5, "f16": 16,
        "bf16": 16, "f32": 32}


# ------------------------------------------------------------------------------- the file


def served_file(spec: ChatbotTrainingSpec, model: Mapping[str, Any] | None) -> dict | None:
    """The exported file to serve (`status.model.files[]`): serve.quantization's, else the
    smallest. None when there is no such file."""
    if not model:
        return None
    files = [f for f in model.get("files") or [] if f.get("path")]
    if not files and model.get("path"):
        files = [{"path": model["path"], "quantization": "", "sizeMb": model.get("sizeMb", 0)}]
    wanted = spec.serve.quantization
    if wanted:
        return next((f for f in files if f.get("quantization") == wanted), None)
    if not files:
        return None
    return min(files, key=lambda f: (f.get("sizeMb") or BITS.get(f.get("quantization"), 99) * 1e6,
                                     BITS.get(f.get("quantization"), 99)))


def invalid_name(name: str) -> str | None:
    """Why `<name>-server` cannot name a Service, or None."""
    service = server_name(name)
    if DNS_1035.match(service) and len(service) <= 63:
        return None
    return (f"The model cannot be served under this name: the Service {service!r} must be a "
            "DNS-1035 label (lowercase letters, digits and '-', starting with a letter, at most "
            "63 characters); create the training under such a name to serve it")


# ------------------------------------------------------------------------------- objects


def selector(name: str) -> dict[str, str]:
    """The labels of a training's server pods (the Deployment's selector, the Service's)."""
    return {
        "app.kubernetes.io/name": manifests.APP_NAME,
        "app.kubernetes.io/instance": manifests.label_value(name),
        "app.kubernetes.io/component": COMPONENT,
    }


# Flags the operator derives from the spec, by every spelling llama.cpp accepts: when
# serve.extraArgs sets one, it is the user's and the operator leaves it out.
DERIVED_FLAGS = {"-c": ("-c", "--ctx-size"), "-np": ("-np", "--parallel"),
                 "--threads-http": ("--threads-http",), "-t": ("-t", "--threads")}
GRACE_MARGIN = 10  # seconds after the preStop wait for the server to exit


def cpu_quantity(value: str | int | float | None) -> float | None:
    """A Kubernetes CPU quantity ('500m', '2', '1.5') in CPUs, or None."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def cpu_threads(spec: ChatbotTrainingSpec) -> int | None:
    """llama.cpp's -t from serve.resources: the CPU limit, else the request, in whole CPUs
    (at least 1). None without either: llama.cpp then takes one thread per core of the node,
    which a pod limited to a few of them pays for with contention."""
    resources = spec.serve.resources
    if resources is None:
        return None
    for values in (resources.limits, resources.requests):
        cpus = cpu_quantity(values.cpu if values else None)
        if cpus:
            return max(1, int(cpus))
    return None


def slot_context(spec: ChatbotTrainingSpec) -> int:
    """Tokens of context each request gets: llama-server splits -c evenly among -np slots."""
    return spec.serve.context_size // spec.serve.parallel


def server_args(name: str, spec: ChatbotTrainingSpec, model_path: str) -> list[str]:
    """llama-server's arguments: -c and -np from serve.contextSize and serve.parallel, an HTTP
    thread per slot and 4 more (llama-server's own minimum; a request holds one while it runs
    or waits), -t from serve.resources' CPU; serve.extraArgs last, and any of those flags they
    set replace the derived one."""
    serve = spec.serve
    given = set(serve.extra_args)
    derived = {"-c": serve.context_size, "-np": serve.parallel,
               "--threads-http": serve.parallel + 4, "-t": cpu_threads(spec)}
    args = ["-m", model_path, "--host", "0.0.0.0", "--port", str(SERVER_PORT), "--metrics",
            "--alias", name]
    for flag, value in derived.items():
        if value is not None and not given.intersection(DERIVED_FLAGS[flag]):
            args += [flag, str(value)]
    if serve.gpus > 0:
        args += ["-ngl", ALL_LAYERS]
    return args + list(serve.extra_args)


def termination(spec: ChatbotTrainingSpec) -> dict[str, Any]:
    """The pod's draining: llama-server ends its running requests at once on SIGTERM (it stops
    its task loop), so a preStop wait of serve.drainSeconds comes first: the pod leaves the
    Service's endpoints (no new requests) while the server finishes the ones it has; then
    SIGTERM, with GRACE_MARGIN seconds to exit."""
    drain = spec.serve.drain_seconds
    result: dict[str, Any] = {"terminationGracePeriodSeconds": drain + GRACE_MARGIN}
    if drain > 0:
        result["lifecycle"] = {"preStop": {"sleep": {"seconds": drain}}}
    return result


def server_image(spec: ChatbotTrainingSpec, config: OperatorConfig) -> str:
    if spec.serve.image:
        return spec.serve.image
    return config.server_cuda_image if spec.serve.gpus > 0 else config.server_image


def _probe(period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": HEALTH_PATH, "port": "http"}, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": failures}


def _container(name: str, spec: ChatbotTrainingSpec, config: OperatorConfig,
               model_path: str) -> dict[str, Any]:
    serve = spec.serve
    env: list[dict[str, Any]] = [{"name": "HOME", "value": "/tmp"}]
    if serve.api_key_secret:
        env.append({"name": "LLAMA_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": serve.api_key_secret.name, "key": serve.api_key_secret.key}}})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": server_image(spec, config),
        "args": server_args(name, spec, model_path),
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "env": env,
        # Loading a large file takes a while: up to 10 minutes before the first answer.
        "startupProbe": _probe(5, 120),
        "readinessProbe": _probe(10, 3),
        "volumeMounts": [{"name": "model", "mountPath": MODEL_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    lifecycle = termination(spec).get("lifecycle")
    if lifecycle:
        container["lifecycle"] = lifecycle
    resources: dict[str, Any] = serve.resources.to_api() if serve.resources else {}
    resources = {kind: dict(values) for kind, values in resources.items() if values}
    if serve.gpus > 0:
        resources.setdefault("limits", {})[spec.gpu.resource_name] = str(serve.gpus)
    if resources:
        container["resources"] = resources
    return container


def _scheduling(spec: ChatbotTrainingSpec, config: OperatorConfig) -> dict[str, Any]:
    """nodeSelector and tolerations of the server pods; with GPUs, the operator's GPU defaults
    (the ones the train step gets) come first."""
    serve = spec.serve
    node_selector = dict(serve.node_selector)
    tolerations = [t.to_api() for t in serve.tolerations]
    if serve.gpus > 0:
        node_selector = {**config.default_node_selector, **node_selector}
        tolerations = [dict(t) for t in config.default_tolerations if dict(t) not in tolerations] \
            + tolerations
    result: dict[str, Any] = {}
    if node_selector:
        result["nodeSelector"] = node_selector
    if tolerations:
        result["tolerations"] = tolerations
    return result


def deployment(training: Mapping[str, Any], spec: ChatbotTrainingSpec, config: OperatorConfig,
               file: Mapping[str, Any]) -> dict[str, Any]:
    """The server's Deployment for `file` (an entry of status.model.files, pvc://<claim>/<path>)."""
    name = training["metadata"]["name"]
    claim, path = manifests.parse_pvc_uri(file["path"]) or ("", "")
    uid = config.step_uid
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the server never talks to the API server
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination(spec)["terminationGracePeriodSeconds"],
        "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [_container(name, spec, config, f"{MODEL_DIR}/{path}")],
        "volumes": [
            {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
            {"name": "tmp", "emptyDir": {}},
        ],
        **_scheduling(spec, config),
    }
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    labels = selector(name)
    body: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": manifests._object_meta(training, server_name(name), COMPONENT),
        "spec": {
            "replicas": spec.serve.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": dict(labels), "annotations": {
                    manifests.ANNOTATION_TRAINING: name,
                    "kubectl.kubernetes.io/default-container": CONTAINER}},
                "spec": pod,
            },
        },
    }
    body["metadata"]["annotations"][ANNOTATION_SPEC_HASH] = spec_hash(body)
    return body


def service(training: Mapping[str, Any]) -> dict[str, Any]:
    name = training["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": manifests._object_meta(training, server_name(name), COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(name),
            "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": "http",
                       "protocol": "TCP"}],
        },
    }


def spec_hash(body: Mapping[str, Any]) -> str:
    """What the operator sets on a Deployment (its labels and spec), as a short hash."""
    text = json.dumps({"labels": body["metadata"]["labels"], "spec": body["spec"]},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def deployment_patch(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict | None:
    """A JSON merge patch turning the existing Deployment into the wanted one (fields the
    operator no longer sets are removed, so the API server defaults them again), or None when
    it already is."""
    from chatbot_operator.status_builder import status_patch  # a generic JSON merge-patch diff

    annotations = (existing.get("metadata") or {}).get("annotations") or {}
    wanted_hash = wanted["metadata"]["annotations"][ANNOTATION_SPEC_HASH]
    if annotations.get(ANNOTATION_SPEC_HASH) == wanted_hash:
        return None
    return {"metadata": {"labels": wanted["metadata"]["labels"],
                         "annotations": {ANNOTATION_SPEC_HASH: wanted_hash}},
            "spec": status_patch(existing.get("spec") or {}, wanted["spec"])}


# ------------------------------------------------------------------------------- plan & status


@dataclasses.dataclass
class ServingPlan:
    """What to do about a training's server, and what to report."""

    deployment: dict[str, Any] | None = None  # create or patch, with the Service
    service: dict[str, Any] | None = None
    remove: bool = False  # delete the Deployment and the Service
    file: Mapping[str, Any] | None = None
    # Set when nothing is served: (reason, message) of the Serving condition.
    not_serving: tuple[str, str] | None = None


def plan(training: Mapping[str, Any], spec: ChatbotTrainingSpec | None,
         status: Mapping[str, Any], config: OperatorConfig) -> ServingPlan | None:
    """None: serving does not concern this training now (serve off and nothing to remove, or
    the training unfinished)."""
    old = training.get("status") or {}
    was_serving = bool(old.get("serving")) or any(
        c.get("type") == CONDITION for c in old.get("conditions") or [])
    if spec is None:
        return None
    name = training["metadata"]["name"]
    phase = status.get("phase")
    if not spec.serve.enabled:
        return ServingPlan(remove=True) if was_serving else None
    if phase == "Failed":
        return ServingPlan(remove=was_serving, not_serving=(
            "TrainingFailed", "Nothing to serve: the training failed"))
    if phase != "Succeeded":
        return None  # served once the export is complete
    problem = invalid_name(name)
    if problem:
        return ServingPlan(not_serving=("InvalidName", problem))
    file = served_file(spec, status.get("model"))
    if file is None:
        wanted = spec.serve.quantization or "any"
        return ServingPlan(remove=was_serving, not_serving=(
            "ModelFileNotFound", f"The export reported no {wanted} file to serve"))
    if manifests.parse_pvc_uri(file["path"]) is None:
        return ServingPlan(remove=was_serving, not_serving=(
            "ModelFileNotOnClaim", f"{file['path']} is not on a claim the server can mount"))
    return ServingPlan(deployment=deployment(training, spec, config, file),
                       service=service(training), file=file)


def _deployment_problem(found: Mapping[str, Any]) -> str | None:
    """Why the Deployment's pods do not come up, as its controller says."""
    for condition in (found.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            return condition.get("message")
        if (condition.get("type") == "Progressing" and condition.get("status") == "False"
                and condition.get("reason") == "ProgressDeadlineExceeded"):
            return condition.get("message")
    return None


def serving_status(training: Mapping[str, Any], wanted: ServingPlan, found: Mapping[str, Any] | None
                   ) -> tuple[dict | None, tuple[str, str, str] | None]:
    """status.serving, and the Serving condition's status, reason and message (None, None:
    serving is off)."""
    if wanted.not_serving is not None:
        reason, message = wanted.not_serving
        return None, ("False", reason, message)
    if wanted.deployment is None:
        return None, None
    meta = training["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    file = wanted.file or {}
    replicas = wanted.deployment["spec"]["replicas"] if wanted.deployment else 0
    ready = int(((found or {}).get("status") or {}).get("readyReplicas") or 0)
    url = server_url(name, namespace)
    serving = {"service": server_name(name), "url": url, "ready": ready > 0,
               "modelFile": file.get("path"), "quantization": file.get("quantization") or None,
               "replicas": replicas, "readyReplicas": ready}
    serving = {k: v for k, v in serving.items() if v is not None}
    if ready > 0:
        return serving, ("True", "Ready", f"Serving {file.get('path')} at {url} "
                                          f"({ready}/{replicas} pods ready)")
    problem = _deployment_problem(found or {})
    if problem:
        return serving, ("False", "ServerNotReady", f"The server pods do not start: {problem}")
    return serving, ("False", "Starting", f"Starting the server of {file.get('path')} "
                                          f"(Deployment {server_name(name)}); it loads the model")


def carried_over(training: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """`status` with the training's last status.serving and Serving condition (when serving
    is not decided now, e.g. the spec is invalid: its objects are left as they are)."""
    old = training.get("status") or {}
    condition = next((c for c in old.get("conditions") or [] if c.get("type") == CONDITION), None)
    new = dict(status)
    if old.get("serving"):
        new["serving"] = old["serving"]
    if condition is not None:
        new["conditions"] = [c for c in new.get("conditions") or []
                             if c.get("type") != CONDITION] + [condition]
    return new


def with_serving(status: Mapping[str, Any], serving: Mapping[str, Any] | None,
                 condition: tuple[str, str, str] | None, old: Sequence[Mapping[str, Any]] | None,
                 now: str, generation: int | None) -> dict[str, Any]:
    """`status` with status.serving and the Serving condition set (None: removed)."""
    new = {k: v for k, v in status.items() if k != "serving"}
    conditions = [c for c in new.get("conditions") or [] if c.get("type") != CONDITION]
    if serving:
        new["serving"] = dict(serving)
    if condition is not None:
        state, reason, message = condition
        prior = next((c for c in old or [] if c.get("type") == CONDITION), {})
        entry = {"type": CONDITION, "status": state, "reason": reason, "message": message[:1024],
                 "lastTransitionTime": prior.get("lastTransitionTime")
                 if prior.get("status") == state and prior.get("lastTransitionTime") else now}
        if generation is not None:
            entry["observedGeneration"] = generation
        conditions.append(entry)
    new["conditions"] = conditions
    return new
