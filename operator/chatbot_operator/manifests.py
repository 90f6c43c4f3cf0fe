"""Pure builders of the objects the operator creates for a ChatbotTraining.

Every function takes the ChatbotTraining body (a dict as read from the API), its parsed spec
and the operator configuration, and returns plain dicts ready to POST. Names are
deterministic, so a restarted operator finds (409 Conflict) instead of duplicating.

Objects created per training `<name>`:
- PersistentVolumeClaim `<name>-workspace` (unless spec.workspace.existingClaim), the volume
  the steps share. It is owned by the training only with reclaimPolicy Delete, so the
  garbage collector removes it with the training; with Retain it stays.
- ConfigMap `<name>-config`, key `config.json`: the trainer's share of the spec plus `name`.
- Job `<name>-<step>` for each step, created in order by the operator.
ConfigMap and Jobs carry a controller ownerReference: deleting the training deletes them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from chatbot_api.spec import (
    DEFAULT_BACKOFF_LIMIT,
    DEFAULT_STEP_DEADLINES,
    GROUP,
    KIND,
    VERSION,
    ChatbotTrainingSpec,
)

from chatbot_operator.settings import OperatorConfig

APP_NAME = "chatbot-training"
MANAGED_BY = "chatbot-operator"
LABEL_TRAINING = f"{GROUP}/training"
LABEL_STEP = f"{GROUP}/step"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
# The full training name (label values are limited to 63 characters, names are not).
ANNOTATION_TRAINING = f"{GROUP}/training-name"
# Set on a Job the operator suspended because of spec.suspend (only those are resumed).
ANNOTATION_SUSPENDED = f"{GROUP}/suspended-by-operator"

CONTAINER = "trainer"
WORKSPACE_DIR = "/workspace"
CONFIG_DIR = "/etc/chatbot"
CONFIG_KEY = "config.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
PVC_ROOT = "/mnt/pvc"
TERMINATION_LOG = "/dev/termination-log"
HF_HOME = f"{WORKSPACE_DIR}/.cache/huggingface"
PVC_SCHEME = "pvc://"

# Steps that run the model and get the GPU, nodeSelector, tolerations and affinity.
GPU_STEPS = ("train", "evaluate")
# Steps that serve their live progress (GET /progress on the container port of this name).
PROGRESS_STEPS = ("train", "evaluate")
PROGRESS_PORT_NAME = "progress"
# Steps that read the base model (a pvc:// modelType is mounted there).
MODEL_STEPS = ("configure", "train", "evaluate", "export")
# Steps that read a chatTemplate file (later steps take it from the tokenizer train saved).
CHAT_TEMPLATE_STEPS = ("configure", "train")

# Trainer exit codes (trainer-image/README.md): retrying cannot help, fail the Job at once.
EXIT_INVALID_INPUT = 2
EXIT_QUALITY_THRESHOLD = 3
EXIT_OUT_OF_MEMORY = 4
PERMANENT_EXIT_CODES = (EXIT_INVALID_INPUT, EXIT_QUALITY_THRESHOLD, EXIT_OUT_OF_MEMORY)

MAX_LABEL = 63


# ------------------------------------------------------------------------------- names


def _shorten(text: str, limit: int) -> str:
    """`text` if it fits, else a truncated prefix plus a hash of the whole (deterministic)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{text[: limit - 9].rstrip('-.')}-{digest}"


def label_value(name: str) -> str:
    """The training name as a label value (at most 63 characters)."""
    return _shorten(name, MAX_LABEL)


def job_name(name: str, step: str) -> str:
    """`<name>-<step>`; Job names end up in a pod label, so they are kept to 63 characters."""
    return f"{_shorten(name, MAX_LABEL - len(step) - 1)}-{step}"


def config_map_name(name: str) -> str:
    return f"{name}-config"


def owned_claim_name(name: str) -> str:
    return f"{name}-workspace"


def workspace_claim_name(name: str, spec: ChatbotTrainingSpec) -> str:
    return spec.workspace.existing_claim or owned_claim_name(name)


def parse_pvc_uri(uri: str | None) -> tuple[str, str] | None:
    """`pvc://<claim>/<path>` → (claim, path without leading slash); None for other URIs."""
    if not uri or not uri.startswith(PVC_SCHEME):
        return None
    claim, _, path = uri[len(PVC_SCHEME):].partition("/")
    return (claim, path.strip("/")) if claim else None


def output_dir(spec: ChatbotTrainingSpec) -> str | None:
    """The container path of spec.outputPath (the export step's --output)."""
    parsed = parse_pvc_uri(spec.output_path)
    if parsed is None:
        return None
    claim, path = parsed
    return f"{PVC_ROOT}/{claim}/{path}" if path else f"{PVC_ROOT}/{claim}"


# ------------------------------------------------------------------------------- metadata


def _meta(training: Mapping[str, Any]) -> Mapping[str, Any]:
    return training.get("metadata") or {}


def owner_reference(training: Mapping[str, Any]) -> dict[str, Any]:
    meta = _meta(training)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(name: str, component: str | None = None) -> dict[str, str]:
    result = {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": label_value(name),
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_TRAINING: label_value(name),
    }
    if component:
        result["app.kubernetes.io/component"] = component
    return result


def _object_meta(
    training: Mapping[str, Any], name: str, component: str, owned: bool = True
) -> dict[str, Any]:
    meta = _meta(training)
    result: dict[str, Any] = {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels(meta["name"], component),
        "annotations": {ANNOTATION_TRAINING: meta["name"]},
    }
    if owned:
        result["ownerReferences"] = [owner_reference(training)]
    return result


# ------------------------------------------------------------------------------- objects


def workspace_pvc(training: Mapping[str, Any], spec: ChatbotTrainingSpec) -> dict[str, Any] | None:
    """The workspace claim the operator creates, or None with spec.workspace.existingClaim."""
    if spec.workspace.existing_claim:
        return None
    name = _meta(training)["name"]
    pvc_spec: dict[str, Any] = {
        "accessModes": [spec.workspace.access_mode],
        "resources": {"requests": {"storage": spec.workspace.size}},
    }
    if spec.workspace.storage_class_name:
        pvc_spec["storageClassName"] = spec.workspace.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _object_meta(
            training, owned_claim_name(name), "workspace",
            owned=spec.workspace.reclaim_policy == "Delete",
        ),
        "spec": pvc_spec,
    }


def config_json(name: str, spec: ChatbotTrainingSpec) -> str:
    """The trainer's config file: TrainingParams in camelCase plus the resource name."""
    data = spec.training_params().to_api()
    data["name"] = name
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def config_map(training: Mapping[str, Any], spec: ChatbotTrainingSpec) -> dict[str, Any]:
    name = _meta(training)["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _object_meta(training, config_map_name(name), "config"),
        "data": {CONFIG_KEY: config_json(name, spec)},
    }


def claim_mounts(
    spec: ChatbotTrainingSpec, step: str
) -> dict[str, bool]:
    """Claims mounted under /mnt/pvc for `step` → read-only?"""
    uses: list[tuple[str | None, bool]] = []
    if step == "prepare":
        uses.append((spec.training_data, True))
    if step in MODEL_STEPS:
        uses.append((spec.model_type, True))
    if step in CHAT_TEMPLATE_STEPS:
        uses.append((spec.chat_template, True))
    if step == "export":
        uses.append((spec.output_path, False))
    mounts: dict[str, bool] = {}
    for uri, read_only in uses:
        parsed = parse_pvc_uri(uri)
        if parsed:
            mounts[parsed[0]] = mounts.get(parsed[0], True) and read_only
    return mounts


def _merged_tolerations(
    spec: ChatbotTrainingSpec, config: OperatorConfig
) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in [dict(t) for t in config.default_tolerations] + [t.to_api() for t in spec.tolerations]:
        key = json.dumps(item, sort_keys=True)
        if key not in seen:
            seen.add(key)
            result.append(item)
    return result


def _resources(spec: ChatbotTrainingSpec, step: str) -> dict[str, Any]:
    resources: dict[str, Any] = spec.resources.to_api() if spec.resources else {}
    resources = {kind: dict(values) for kind, values in resources.items() if values}
    if step in GPU_STEPS and spec.gpu.count > 0:
        resources.setdefault("limits", {})[spec.gpu.resource_name] = str(spec.gpu.count)
    return resources


def step_args(spec: ChatbotTrainingSpec, step: str) -> list[str]:
    args = [step, "--workspace", WORKSPACE_DIR, "--config", CONFIG_PATH]
    output = output_dir(spec)
    if step == "export" and output:
        args += ["--output", output]
    return args


def pod_spec(
    training: Mapping[str, Any], spec: ChatbotTrainingSpec, step: str, config: OperatorConfig
) -> dict[str, Any]:
    name = _meta(training)["name"]
    workspace_claim = workspace_claim_name(name, spec)
    uid = config.step_uid

    volumes: list[dict[str, Any]] = [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": workspace_claim}},
        {"name": "config", "configMap": {
            "name": config_map_name(name),
            "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}],
        }},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "workspace", "mountPath": WORKSPACE_DIR},
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if step in GPU_STEPS:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    for index, (claim, read_only) in enumerate(sorted(claim_mounts(spec, step).items())):
        path = f"{PVC_ROOT}/{claim}"
        if claim == workspace_claim:  # the same claim: mount the workspace volume again
            mounts.append({"name": "workspace", "mountPath": path})
            continue
        volume = f"pvc-{index}"
        claim_ref: dict[str, Any] = {"claimName": claim}
        if read_only:
            claim_ref["readOnly"] = True
        volumes.append({"name": volume, "persistentVolumeClaim": claim_ref})
        mount: dict[str, Any] = {"name": volume, "mountPath": path}
        if read_only:
            mount["readOnly"] = True
        mounts.append(mount)

    env = [
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "CHATBOT_PVC_ROOT", "value": PVC_ROOT},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or config.trainer_image,
        "args": step_args(spec, step),
        "env": env,
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    if step in PROGRESS_STEPS and config.progress_port:
        # read by the operator on the pod's IP: the pod needs no API credentials for it
        env.append({"name": "CHATBOT_PROGRESS_PORT", "value": str(config.progress_port)})
        container["ports"] = [{"name": PROGRESS_PORT_NAME, "containerPort": config.progress_port,
                               "protocol": "TCP"}]
    pull_policy = spec.image_pull_policy or config.image_pull_policy
    if pull_policy:
        container["imagePullPolicy"] = pull_policy
    if spec.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": spec.env_from_secret}}]
    resources = _resources(spec, step)
    if resources:
        container["resources"] = resources

    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # retries are the Job's (backoffLimit, podFailurePolicy)
        "automountServiceAccountToken": False,  # the trainer never talks to the API server
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": secret} for secret in spec.image_pull_secrets]
    if step in GPU_STEPS:
        node_selector = {**config.default_node_selector, **spec.node_selector}
        if node_selector:
            pod["nodeSelector"] = node_selector
        tolerations = _merged_tolerations(spec, config)
        if tolerations:
            pod["tolerations"] = tolerations
        if spec.affinity:
            pod["affinity"] = spec.affinity.to_api()
    return pod


def step_policy(spec: ChatbotTrainingSpec, step: str) -> tuple[int, int]:
    """(activeDeadlineSeconds, backoffLimit) of a step: spec.steps.<step> or the defaults."""
    policy = getattr(spec.steps, step)
    deadline = policy.active_deadline_seconds or DEFAULT_STEP_DEADLINES[step]
    backoff = (
        policy.backoff_limit if policy.backoff_limit is not None else DEFAULT_BACKOFF_LIMIT
    )
    return deadline, backoff


def step_job(
    training: Mapping[str, Any], spec: ChatbotTrainingSpec, step: str, config: OperatorConfig
) -> dict[str, Any]:
    """The Job running one step."""
    name = _meta(training)["name"]
    deadline, backoff = step_policy(spec, step)
    metadata = _object_meta(training, job_name(name, step), step)
    metadata["labels"][LABEL_STEP] = step
    if spec.queue_name:
        metadata["labels"][LABEL_QUEUE] = spec.queue_name
    template_meta = {
        "labels": {k: v for k, v in metadata["labels"].items() if k != LABEL_QUEUE},
        "annotations": {
            ANNOTATION_TRAINING: name,
            "kubectl.kubernetes.io/default-container": CONTAINER,
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": backoff,
            "activeDeadlineSeconds": deadline,
            # Kueue admits a queued Job by unsuspending it: it is created suspended.
            "suspend": spec.suspend or bool(spec.queue_name),
            # Replace a failed pod only once it is gone (GPUs and RWO volumes are exclusive).
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {
                "rules": [
                    # Preemption/eviction/node drain: retry without using up backoffLimit
                    # (train resumes from its last checkpoint).
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                    # Invalid input, quality threshold, out of memory: retrying cannot help.
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            "values": list(PERMANENT_EXIT_CODES),
                        },
                    },
                ]
            },
            "template": {
                "metadata": template_meta,
                "spec": pod_spec(training, spec, step, config),
            },
        },
    }


# ------------------------------------------------------------------------------- peering


def peering_objects(name: str, namespaces: tuple[str, ...] | None) -> list[tuple[str, dict]]:
    """(API path, body) of the Kopf peering object(s) the operator's replicas share: one
    ClusterKopfPeering (namespaces None: all namespaces served) or a KopfPeering per served
    namespace."""
    meta = {"name": name, "labels": {"app.kubernetes.io/name": APP_NAME,
                                     "app.kubernetes.io/managed-by": MANAGED_BY}}
    if namespaces is None:
        return [("/apis/kopf.dev/v1/clusterkopfpeerings",
                 {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": meta})]
    return [(f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings",
             {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
              "metadata": {**meta, "namespace": namespace}})
            for namespace in namespaces]
