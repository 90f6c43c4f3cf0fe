"""Serving the exported model: `spec.serve` (what to run) and `status.serving` (where it runs).

With `serve.enabled`, the operator runs llama.cpp's OpenAI-compatible server on one exported
GGUF file once the training has succeeded: a Deployment and a Service `<name>-server`, the
URL in `status.serving.url`. Off by default.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StringConstraints

from chatbot_api.base import ApiModel, CrossFieldRule
from chatbot_api.corev1 import (
    DnsSubdomain,
    ImageRef,
    LABEL_MAP_SCHEMA,
    MAX_LABELS,
    LabelKeyOfMap,
    LabelValue,
    ResourcesSpec,
    Toleration,
)

SERVER_PORT = 8080
SERVER_SUFFIX = "-server"
# The export's default quantizations (spec.export.quantizations when it is not set).
DEFAULT_QUANTIZATIONS = ("f16", "q8_0")

SecretKey = Annotated[str, StringConstraints(min_length=1, max_length=253,
                                             pattern=r"^[-._a-zA-Z0-9]+$")]


class SecretKeyRef(ApiModel):
    name: DnsSubdomain = Field(..., description="Name of the Secret.")
    key: SecretKey = Field(..., description="Key in the Secret holding the value.")


class ServeSpec(ApiModel):
    enabled: bool = Field(
        False, description="Serve the exported model with llama.cpp's OpenAI-compatible server "
        "(a Deployment and a Service <name>-server) once the training has succeeded.")
    quantization: str | None = Field(
        None, max_length=16, pattern=r"^[a-z0-9_]+$",
        description="Which exported file to serve; one of export.quantizations "
        "(default: the smallest exported file).")
    replicas: int = Field(1, ge=1, le=64, description="Server pods.")
    context_size: int = Field(
        4096, ge=256, le=1_048_576,
        description="Context of the server in tokens (llama.cpp -c), split evenly among its "
        "parallel slots: each request gets contextSize / parallel tokens (prompt and answer).")
    parallel: int = Field(
        4, ge=1, le=64,
        description="Requests each server pod generates at once (llama.cpp -np, its slots); "
        "more wait in the server's queue. Each slot gets contextSize / parallel tokens.")
    drain_seconds: int = Field(
        20, ge=0, le=3600,
        description="On a rolling update or scale-down, how long a server pod keeps answering "
        "the requests it has before it is stopped (a preStop wait: llama.cpp's server ends "
        "its requests at once on SIGTERM); terminationGracePeriodSeconds is this plus 10.")
    gpus: int = Field(
        0, ge=0, le=16, description="GPUs per server pod (gpu.resourceName); with GPUs every "
        "layer is offloaded (-ngl 999) and the CUDA server image is used.")
    resources: ResourcesSpec | None = Field(
        None, description="CPU/memory requests and limits of the server container.")
    node_selector: dict[LabelKeyOfMap, LabelValue] = Field(
        default_factory=dict, max_length=MAX_LABELS, json_schema_extra=LABEL_MAP_SCHEMA,
        description="Node labels the server pods must run on.")
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Tolerations of the server pods.")
    api_key_secret: SecretKeyRef | None = Field(
        None, description="Secret key holding the API key clients must send "
        "(Authorization: Bearer <key>); without it the server needs no key.")
    image: ImageRef | None = Field(
        None, description="Server image (default: the operator's pinned llama.cpp server "
        "image, its CUDA variant with gpus).")
    extra_args: list[Annotated[str, StringConstraints(max_length=1024)]] = Field(
        default_factory=list, max_length=64,
        description="More llama.cpp server arguments, e.g. [--parallel, '4'].")


class ServingStatus(ApiModel):
    service: str | None = Field(None, description="The Service in front of the server pods.")
    url: str | None = Field(None, description="OpenAI-compatible base URL inside the cluster.")
    ready: bool = Field(False, description="At least one server pod answers.")
    model_file: str | None = Field(None, description="The GGUF file being served.")
    quantization: str | None = None
    replicas: int | None = None
    ready_replicas: int | None = None


def _quantizations(spec) -> list[str]:
    return list(spec.export.quantizations)


SERVE_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        cel="!has(self.serve) || (has(self.serve.contextSize) ? self.serve.contextSize : 4096) "
        "/ (has(self.serve.parallel) ? self.serve.parallel : 4) >= 256",
        message="serve.contextSize / serve.parallel must be at least 256: each parallel slot "
        "gets that many tokens of context",
        holds=lambda s: s.serve.context_size // s.serve.parallel >= 256,
    ),
    CrossFieldRule(
        cel="!has(self.serve) || !has(self.serve.quantization) || self.serve.quantization in "
        "(has(self.export) && has(self.export.quantizations) ? self.export.quantizations : "
        f"{list(DEFAULT_QUANTIZATIONS)})",
        message="serve.quantization must be one of export.quantizations: only exported files "
        "can be served",
        holds=lambda s: s.serve.quantization is None
        or s.serve.quantization in _quantizations(s),
    ),
)


def server_name(name: str) -> str:
    """The Deployment and Service of a training's server."""
    return f"{name}{SERVER_SUFFIX}"


def server_url(name: str, namespace: str) -> str:
    return f"http://{server_name(name)}.{namespace}.svc:{SERVER_PORT}/v1"
