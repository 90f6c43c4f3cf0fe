"""The formats of fields passed on to pods and claims match what the API server accepts there.

Examples come from apimachinery's validation (IsDNS1123Label/Subdomain, IsQualifiedName,
IsValidLabelValue, resource.ParseQuantity); the Affinity model is compared with the
Kubernetes 1.37 OpenAPI schema that kubernetes-validate ships.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from chatbot_api import corev1
from chatbot_api.crd import build_crd
from chatbot_api.spec import DATA_URI, MODEL_REF

CASES = {
    corev1.QUANTITY: (["1", "500m", "1.5", ".5", "32Gi", "100Mi", "1e3", "1E-3", "+2", "-1", "0"],
                      ["lots", "32 GB", "1Gb", "1.5.5", "Gi", "", "1e", "1ki"]),
    corev1.DNS_SUBDOMAIN: (["a", "hf-token", "batch.low", "a1.b2-c3"],
                           ["", "HF_TOKEN", "-a", "a-", "a..b", "a_b", "Trainer SA"]),
    corev1.DNS_LABEL: (["a", "chat-data", "a1"], ["a.b", "A", "a-", "-a", ""]),
    corev1.LABEL_VALUE: (["", "H100", "NVIDIA-A100-SXM4-80GB", "a.b_c-d"],
                         ["bad value", "-a", "a-", "a/b"]),
    corev1.LABEL_KEY: (["pool", "nvidia.com/gpu.product", "kubernetes.io/hostname", "A_b.c"],
                       ["", "gpu type", "/a", "a/", "a/b/c", "Example.com/a", "-a"]),
    DATA_URI: (["/data/chat.jsonl", "chat.jsonl", "pvc://chat-data/a/b.jsonl",
                "https://example.com/a.jsonl", "http://host:8080/a", "s3://bucket/key.jsonl",
                "file:///data/a.jsonl", "/data/chat:v2.jsonl"],
               ["ftp://host/a.jsonl", "pvc://Chat_Data/a.jsonl", "pvc://chat-data/",
                "pvc://chat.data/a", "s3://bucket", "gs://bucket/a"]),
    MODEL_REF: (["gpt", "Qwen/Qwen2.5-0.5B-Instruct", "/models/base", "pvc://models/base"],
                ["pvc://models.v2/base", "hf://org/model", "pvc://models/"]),
}


@pytest.mark.parametrize("pattern", list(CASES), ids=lambda p: p[:24])
def test_patterns_accept_and_refuse_like_the_api_server(pattern: str):
    valid, invalid = CASES[pattern]
    for value in valid:
        assert re.search(pattern, value), f"{value!r} should match"
    for value in invalid:
        assert not re.search(pattern, value), f"{value!r} should not match"


def test_label_key_lengths():
    key = corev1.LabelKeyOfMap.__metadata__[0].func  # the model's key check
    key("a" * 253 + "/" + "b" * 63)
    for bad in ("a" * 254 + "/b", "b" * 64):
        with pytest.raises(ValueError, match="is not a label key"):
            key(bad)


# ------------------------------------------------------------------------------- Affinity


def _k8s_definitions() -> dict[str, Any]:
    import kubernetes_validate

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    return json.loads((root / "v1.37.0-local-strict" / "_definitions.json").read_text())["$defs"]


def _fields(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> Any:
    """The property tree of a schema (names and required lists), $refs resolved."""
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if schema.get("type") == "array" or "items" in schema:
        return ["array", _fields(schema.get("items", {}), defs, depth + 1)]
    if "properties" in schema and depth < 12:
        return {"required": sorted(schema.get("required", [])),
                **{name: _fields(sub, defs, depth + 1)
                   for name, sub in schema["properties"].items()}}
    if "additionalProperties" in schema:
        return "map"
    return "value"


def test_affinity_has_the_fields_of_core_v1_affinity():
    defs = _k8s_definitions()
    ours = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]["affinity"]
    assert _fields(ours, {}) == _fields(defs["io.k8s.api.core.v1.Affinity"], defs)


def test_toleration_has_the_fields_of_core_v1_toleration():
    defs = _k8s_definitions()
    ours = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]["tolerations"]["items"]
    assert set(ours["properties"]) == set(defs["io.k8s.api.core.v1.Toleration"]["properties"])
