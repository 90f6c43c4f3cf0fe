"""Pure builders and decisions for a train step on several processes (torchrun).

- `gpu.count` N > 1 on one node: the train container runs torchrun with a standalone
  rendezvous, one process per GPU (`--nproc-per-node=N`).
- `nodes` M > 1: the train Job is an Indexed Job (completions = parallelism = M), one pod per
  node, each with N GPUs, beside a headless Service (`publishNotReadyAddresses`) so that the
  pods reach `<job>-0.<service>` before they are ready. torchrun's static rendezvous: node
  rank from `JOB_COMPLETION_INDEX`, rank 0's pod as master, port 29500.
  One failed pod fails the Job (backoffLimit 0, podFailurePolicy); the operator then creates
  the train Job again (`<name>-train-2`, …), which resumes from the last checkpoint, until
  `steps.train.backoffLimit` + 1 attempts failed.

The train container runs torchrun through `python -m chatbot_trainer.launch` (torchrun's own
options), which exits with the failed rank's exit code, so permanent failures (invalid input,
quality threshold, out of memory) are still told from those worth another attempt.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from chatbot_api.spec import GROUP, ChatbotTrainingSpec, world_size  # the rule the CRD checks, too

from chatbot_operator import manifests
from chatbot_operator.diagnose import pod_failure_detail
from chatbot_operator.observe import terminated_state
from chatbot_operator.settings import OperatorConfig

MASTER_PORT = 29500
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"  # set by the Job controller on its pods
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
LAUNCHER = ["python", "-m", "chatbot_trainer.launch"]
TRAIN_MODULE = ["-m", "chatbot_trainer.cli"]
# Indexed pods are called <job>-<index> (also their hostname, a 63-character DNS label).
MAX_INDEXED_JOB_NAME = manifests.MAX_LABEL - len("-63")


# ------------------------------------------------------------------------------- sizes


def processes_per_node(spec: ChatbotTrainingSpec) -> int:
    return max(spec.gpu.count, 1)


def is_distributed(spec: ChatbotTrainingSpec) -> bool:
    return world_size(spec) > 1


# ------------------------------------------------------------------------------- names


def _dns_label(text: str, limit: int) -> str:
    """`text` as a DNS label of at most `limit` characters (dots replaced, hashed if changed)."""
    label = text.replace(".", "-")
    if label == text and len(label) <= limit:
        return label
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{label[: limit - 9].rstrip('-')}-{digest}"


def train_job_name(name: str, spec: ChatbotTrainingSpec, attempt: int = 1) -> str:
    """`<name>-train` (as every step's Job); on several nodes a DNS label short enough for
    the pods' hostnames, and `<name>-train-<attempt>` from the second attempt on."""
    if spec.nodes <= 1:
        return manifests.job_name(name, "train")
    suffix = "-train" if attempt <= 1 else f"-train-{attempt}"
    return _dns_label(f"{name}{suffix}", MAX_INDEXED_JOB_NAME)


def job_name_for(name: str, spec: ChatbotTrainingSpec, step: str, attempt: int = 1) -> str:
    return train_job_name(name, spec, attempt) if step == "train" else manifests.job_name(name, step)


def matches_step_job(name: str, step: str, job: Mapping[str, Any]) -> bool:
    """Whether `job` (labelled with `step`) is one of the training's Jobs of that step, in
    either naming (the spec's nodes may have changed since it was created)."""
    job_name = (job.get("metadata") or {}).get("name")
    if step != "train":
        return job_name == manifests.job_name(name, step)
    attempt = attempt_of(job)
    suffix = "-train" if attempt <= 1 else f"-train-{attempt}"
    return job_name in (manifests.job_name(name, "train"),
                        _dns_label(f"{name}{suffix}", MAX_INDEXED_JOB_NAME))


def attempt_of(job: Mapping[str, Any] | None) -> int:
    labels = ((job or {}).get("metadata") or {}).get("labels") or {}
    value = str(labels.get(LABEL_ATTEMPT) or "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def service_name(job_name: str) -> str:
    """The headless Service of an Indexed train Job: a DNS-1035 label (starts with a letter)."""
    return job_name if job_name[:1].isalpha() else _dns_label(f"n-{job_name}", manifests.MAX_LABEL)


def master_address(job_name: str, namespace: str) -> str:
    return f"{job_name}-0.{service_name(job_name)}.{namespace}.svc"


# ------------------------------------------------------------------------------- objects


def step_objects(training: Mapping[str, Any], spec: ChatbotTrainingSpec, step: str,
                 config: OperatorConfig, attempt: int = 1) -> list[dict[str, Any]]:
    """What to create for a step, in order: the Job last (on several nodes its Service first)."""
    job = manifests.step_job(training, spec, step, config)
    if step != "train" or not is_distributed(spec):
        return [job]
    meta = training["metadata"]
    job = copy.deepcopy(job)
    job_name = train_job_name(meta["name"], spec, attempt)
    job["metadata"]["name"] = job_name
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["command"] = list(LAUNCHER)
    container["args"] = torchrun_options(spec, job_name, meta["namespace"]) + TRAIN_MODULE + container["args"]
    if spec.nodes <= 1:
        return [job]
    job["metadata"]["labels"][LABEL_ATTEMPT] = str(attempt)
    return [headless_service(training, job_name), indexed(job, spec)]


def torchrun_options(spec: ChatbotTrainingSpec, job_name: str, namespace: str) -> list[str]:
    per_node = processes_per_node(spec)
    if spec.nodes <= 1:
        return ["--standalone", f"--nproc-per-node={per_node}"]
    return [f"--nnodes={spec.nodes}", f"--nproc-per-node={per_node}",
            "--node-rank=$(JOB_COMPLETION_INDEX)",
            f"--master-addr={master_address(job_name, namespace)}", f"--master-port={MASTER_PORT}"]


def indexed(job: dict[str, Any], spec: ChatbotTrainingSpec) -> dict[str, Any]:
    """The train Job as one pod per node: any failed pod fails the Job (the operator decides
    about another attempt)."""
    job_spec = job["spec"]
    job_spec.update(
        completionMode="Indexed",
        completions=spec.nodes,
        parallelism=spec.nodes,
        backoffLimit=0,
        podFailurePolicy={"rules": [
            {"action": "FailJob", "onExitCodes": {
                "containerName": manifests.CONTAINER, "operator": "NotIn", "values": [0]}},
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
    )
    template = job_spec["template"]
    template["metadata"]["labels"][LABEL_ATTEMPT] = job["metadata"]["labels"][LABEL_ATTEMPT]
    pod = template["spec"]
    pod["subdomain"] = service_name(job["metadata"]["name"])
    container = pod["containers"][0]
    container["env"] = [
        *container["env"],
        # Set by the Job controller too; named here so that `$(JOB_COMPLETION_INDEX)` expands.
        {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}}},
    ]
    # Beside the step's own ports (the live progress the operator reads), not instead of them.
    container["ports"] = [*(port for port in container.get("ports") or [] if port.get("name") != "rendezvous"),
                          {"name": "rendezvous", "containerPort": MASTER_PORT}]
    return job


def headless_service(training: Mapping[str, Any], job_name: str) -> dict[str, Any]:
    """DNS names for the pods of an Indexed train Job, ready or not (`<job>-<i>.<service>`)."""
    meta = training["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(job_name),
            "namespace": meta["namespace"],
            "labels": {**manifests.labels(meta["name"], "train"), manifests.LABEL_STEP: "train"},
            "annotations": {manifests.ANNOTATION_TRAINING: meta["name"]},
            "ownerReferences": [manifests.owner_reference(training)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB_NAME: job_name},
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


# ------------------------------------------------------------------------------- attempts


@dataclasses.dataclass(frozen=True)
class Retry:
    attempt: int  # the attempt to start
    job_name: str
    message: str


def max_attempts(spec: ChatbotTrainingSpec) -> int:
    _, backoff = manifests.step_policy(spec, "train")
    return backoff + 1


def first_failed_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The pod that failed first (the others usually fail because it went away)."""
    failed = [p for p in pods if ((p.get("status") or {}).get("phase") == "Failed")]
    return min(failed, key=lambda p: (terminated_state(p) or {}).get("finishedAt") or "~",
               default=None)


def node_index(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    return str((meta.get("annotations") or {}).get(COMPLETION_INDEX)
               or (meta.get("labels") or {}).get(COMPLETION_INDEX) or "?")


def failure_cause(spec: ChatbotTrainingSpec, pods: Sequence[Mapping[str, Any]]) -> str:
    """Which node index failed first, and why (from its pod's termination state)."""
    pod = first_failed_pod(pods)
    if pod is None:
        return "a pod failed"
    terminated = terminated_state(pod) or {}
    detail = pod_failure_detail("train", pod, spec)
    why = detail[1] if detail else (terminated.get("reason") or "it failed")
    name = (pod.get("metadata") or {}).get("name")
    return f"node {node_index(pod)} (pod {name}) failed first: {why}"


def permanent(state: Any, pods: Sequence[Mapping[str, Any]]) -> bool:
    """Another attempt cannot help: invalid input, a quality threshold, out of memory, the
    step's deadline."""
    if state.reason == "DeadlineExceeded":
        return True
    for pod in pods:
        terminated = terminated_state(pod) or {}
        if (terminated.get("exitCode") in manifests.PERMANENT_EXIT_CODES
                or terminated.get("reason") == "OOMKilled"):
            return True
    return False


def next_attempt(name: str, spec: ChatbotTrainingSpec, state: Any) -> Retry | None:
    """Another attempt of a failed multi-node train Job, or None (not multi-node, not failed,
    permanent, or no attempts left: then the failure message says how many were made)."""
    if spec.nodes <= 1 or state.phase != "Failed" or state.job is None:
        return None
    attempt = attempt_of(state.job)
    cause = failure_cause(spec, state.pods)
    if permanent(state, state.pods):
        return None
    if attempt >= max_attempts(spec):
        state.message = (f"{state.message} (attempt {attempt} of {max_attempts(spec)}, "
                         f"as many as spec.steps.train.backoffLimit allows; {cause})")
        return None
    job_name = train_job_name(name, spec, attempt + 1)
    return Retry(attempt + 1, job_name, (
        f"Step train attempt {attempt} of {max_attempts(spec)} failed: {cause}; starting "
        f"attempt {attempt + 1} (Job {job_name}), which resumes from the last checkpoint"))


def describe(state: Any, spec: ChatbotTrainingSpec) -> None:
    """World size and nodes of the train step; on several nodes, attempts count Jobs."""
    if not is_distributed(spec):
        return
    state.world_size = world_size(spec)
    state.nodes = spec.nodes
    if spec.nodes > 1 and state.job is not None:
        state.attempts = attempt_of(state.job)
