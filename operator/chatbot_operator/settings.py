"""Operator configuration, read from the environment (the Helm chart sets these variables).

Command-line flags of `chatbot-operator` override the environment (see `__main__.py`).

| variable | default | meaning |
| --- | --- | --- |
| CHATBOT_TRAINER_IMAGE | ghcr.io/chatbot-training/trainer:0.1.0 | image of the step Jobs (spec.image overrides) |
| CHATBOT_IMAGE_PULL_POLICY | (unset) | imagePullPolicy of the step containers (spec.imagePullPolicy overrides) |
| CHATBOT_NAMESPACES | (empty: all namespaces) | comma-separated namespaces to serve |
| CHATBOT_METRICS_PORT | 8080 | Prometheus `/metrics` port (0: any free port, -1: disabled) |
| CHATBOT_HEALTH_PORT | 8081 | liveness endpoint `/healthz` (-1: disabled) |
| CHATBOT_PEERING_NAME | chatbot-operator | Kopf peering object (the operator creates it); empty: standalone (one replica) |
| CHATBOT_PEERING_PRIORITY | (random) | priority among replicas; the highest one is active |
| CHATBOT_DEFAULT_NODE_SELECTOR | {} | JSON object merged under spec.nodeSelector (train/evaluate) |
| CHATBOT_DEFAULT_TOLERATIONS | [] | JSON list added to spec.tolerations (train/evaluate) |
| CHATBOT_STEP_UID | 1000 | non-root uid/gid/fsGroup of the step pods |
| CHATBOT_RESYNC_SECONDS | 60 | period of the safety re-check of each running training |
| CHATBOT_SERVER_IMAGE | ghcr.io/ggml-org/llama.cpp:server-b11312 | llama.cpp server image of spec.serve (spec.serve.image overrides) |
| CHATBOT_SERVER_CUDA_IMAGE | ghcr.io/ggml-org/llama.cpp:server-cuda-b11312 | the same with CUDA, for spec.serve.gpus > 0 |
| CHATBOT_PROGRESS_SECONDS | 10 | how often the live progress of a running train/evaluate step is read (at most) |
| CHATBOT_PROGRESS_PORT | 8470 | port the train/evaluate pods serve live progress on (0: not served, not read) |
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

DEFAULT_TRAINER_IMAGE = "ghcr.io/chatbot-training/trainer:0.1.0"
# llama.cpp build b11312 (commit 0c1e570): the llama.cpp that the pinned llama-cpp-python vendors,
# that `chatbot-training serve` and the tests run, and that scripts/llama-server.sh builds.
DEFAULT_SERVER_IMAGE = "ghcr.io/ggml-org/llama.cpp:server-b11312"
DEFAULT_SERVER_CUDA_IMAGE = "ghcr.io/ggml-org/llama.cpp:server-cuda-b11312"
DEFAULT_PEERING_NAME = "chatbot-operator"
DEFAULT_RESYNC_SECONDS = 60.0
DEFAULT_PROGRESS_SECONDS = 10.0
DEFAULT_PROGRESS_PORT = 8470
PULL_POLICIES = ("Always", "IfNotPresent", "Never")


class ConfigError(ValueError):
    """An operator setting has an invalid value (the message names the variable)."""


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str | None = None
    namespaces: tuple[str, ...] = ()
    metrics_port: int = 8080
    health_port: int = 8081
    peering_name: str | None = DEFAULT_PEERING_NAME
    peering_priority: int | None = None
    default_node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    default_tolerations: tuple[Mapping[str, Any], ...] = ()
    step_uid: int = 1000
    server_image: str = DEFAULT_SERVER_IMAGE
    server_cuda_image: str = DEFAULT_SERVER_CUDA_IMAGE
    progress_seconds: float = DEFAULT_PROGRESS_SECONDS
    progress_port: int = DEFAULT_PROGRESS_PORT

    def __post_init__(self) -> None:
        if not self.trainer_image:
            raise ConfigError("CHATBOT_TRAINER_IMAGE must not be empty")
        if self.image_pull_policy is not None and self.image_pull_policy not in PULL_POLICIES:
            raise ConfigError(
                f"CHATBOT_IMAGE_PULL_POLICY must be one of {', '.join(PULL_POLICIES)}, "
                f"not {self.image_pull_policy!r}"
            )
        if self.step_uid <= 0:
            raise ConfigError("CHATBOT_STEP_UID must be a positive (non-root) uid")
        for name, port in (("CHATBOT_METRICS_PORT", self.metrics_port),
                           ("CHATBOT_HEALTH_PORT", self.health_port)):
            if not -1 <= port <= 65535:
                raise ConfigError(f"{name} must be a port number, 0 (any) or -1 (disabled)")
        if not 0 <= self.progress_port <= 65535:
            raise ConfigError("CHATBOT_PROGRESS_PORT must be a port number or 0 (disabled)")
        if not self.progress_seconds > 0:
            raise ConfigError("CHATBOT_PROGRESS_SECONDS must be positive")

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def standalone(self) -> bool:
        return not self.peering_name

    def replace(self, **changes: Any) -> "OperatorConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "OperatorConfig":
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        if env.get("CHATBOT_TRAINER_IMAGE"):
            kwargs["trainer_image"] = env["CHATBOT_TRAINER_IMAGE"]
        for var, key in (("CHATBOT_SERVER_IMAGE", "server_image"),
                         ("CHATBOT_SERVER_CUDA_IMAGE", "server_cuda_image")):
            if env.get(var, "").strip():
                kwargs[key] = env[var].strip()
        if env.get("CHATBOT_IMAGE_PULL_POLICY"):
            kwargs["image_pull_policy"] = env["CHATBOT_IMAGE_PULL_POLICY"]
        if "CHATBOT_NAMESPACES" in env:
            kwargs["namespaces"] = parse_namespaces(env["CHATBOT_NAMESPACES"])
        for var, key in (("CHATBOT_METRICS_PORT", "metrics_port"),
                         ("CHATBOT_HEALTH_PORT", "health_port"),
                         ("CHATBOT_STEP_UID", "step_uid"),
                         ("CHATBOT_PROGRESS_PORT", "progress_port"),
                         ("CHATBOT_PEERING_PRIORITY", "peering_priority")):
            if env.get(var, "").strip():
                kwargs[key] = _int(var, env[var])
        if env.get("CHATBOT_PROGRESS_SECONDS", "").strip():
            kwargs["progress_seconds"] = _float("CHATBOT_PROGRESS_SECONDS", env["CHATBOT_PROGRESS_SECONDS"])
        if "CHATBOT_PEERING_NAME" in env:
            kwargs["peering_name"] = env["CHATBOT_PEERING_NAME"].strip() or None
        if env.get("CHATBOT_DEFAULT_NODE_SELECTOR", "").strip():
            kwargs["default_node_selector"] = parse_node_selector(
                env["CHATBOT_DEFAULT_NODE_SELECTOR"]
            )
        if env.get("CHATBOT_DEFAULT_TOLERATIONS", "").strip():
            kwargs["default_tolerations"] = parse_tolerations(env["CHATBOT_DEFAULT_TOLERATIONS"])
        return cls(**kwargs)


def resync_seconds_from_env(environ: Mapping[str, str] | None = None) -> float:
    """CHATBOT_RESYNC_SECONDS (read once, when the handlers are registered)."""
    env = os.environ if environ is None else environ
    text = env.get("CHATBOT_RESYNC_SECONDS", "").strip()
    if not text:
        return DEFAULT_RESYNC_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("CHATBOT_RESYNC_SECONDS must be a number") from None
    if value <= 0:
        raise ConfigError("CHATBOT_RESYNC_SECONDS must be positive")
    return value


def parse_namespaces(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def parse_node_selector(text: str) -> dict[str, str]:
    value = _json("CHATBOT_DEFAULT_NODE_SELECTOR", text)
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError('CHATBOT_DEFAULT_NODE_SELECTOR must be a JSON object of strings, '
                          'e.g. {"nvidia.com/gpu.present": "true"}')
    return value


def parse_tolerations(text: str) -> tuple[dict[str, Any], ...]:
    value = _json("CHATBOT_DEFAULT_TOLERATIONS", text)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError('CHATBOT_DEFAULT_TOLERATIONS must be a JSON list of tolerations, '
                          'e.g. [{"key": "nvidia.com/gpu", "operator": "Exists", '
                          '"effect": "NoSchedule"}]')
    return tuple(value)


def _json(var: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{var} is not valid JSON: {exc}") from None


def _float(var: str, text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ConfigError(f"{var} must be a number, not {text!r}") from None


def _int(var: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"{var} must be an integer, not {text!r}") from None
