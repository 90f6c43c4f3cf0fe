"""The model server's objects (spec.serve) as the operator installed by the chart builds them for
examples/chatbottraining.yaml, and the NetworkPolicy example: validated against Kubernetes 1.37
and built by the real kubectl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from chatbot_api.spec import ChatbotTrainingSpec
from deploy_support import REPO_ROOT, Tools, load_objects, one, validate_object

EXAMPLES = REPO_ROOT / "examples"
OPERATOR = "chatbot-training-operator"


def chart_config(tools: Tools):
    """The OperatorConfig the chart's default values give the operator."""
    from chatbot_operator.settings import OperatorConfig

    deployment = one(tools.template(), "Deployment", OPERATOR)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return OperatorConfig.from_env(env)


def succeeded_example() -> dict[str, Any]:
    """examples/chatbottraining.yaml as the operator reads it after a successful export."""
    (training,) = load_objects((EXAMPLES / "chatbottraining.yaml").read_text())
    training["metadata"].update(namespace="ml", uid="0b7c6a4e-3f0e-4d3c-9b51-1f2d3c4b5a69")
    out = "pvc://chat-data/models/support-bot"
    training["status"] = {"phase": "Succeeded", "model": {
        "path": f"{out}/support-bot.q8_0.gguf", "format": "gguf", "sizeMb": 506.5,
        "files": [{"path": f"{out}/support-bot.q8_0.gguf", "quantization": "q8_0", "sizeMb": 506.5},
                  {"path": f"{out}/support-bot.f16.gguf", "quantization": "f16", "sizeMb": 948.1}]}}
    return training


@pytest.fixture(scope="module")
def server_objects(tools: Tools) -> list[dict[str, Any]]:
    from chatbot_operator import serving

    training = succeeded_example()
    spec = ChatbotTrainingSpec.model_validate(training["spec"])
    assert spec.serve.enabled, "the full example serves its model"
    wanted = serving.plan(training, spec, training["status"], chart_config(tools))
    assert wanted is not None and wanted.deployment and wanted.service
    return [wanted.deployment, wanted.service]


def test_server_objects_validate_against_kubernetes(server_objects: list[dict[str, Any]]) -> None:
    for obj in server_objects:
        validate_object(obj)


def test_server_runs_the_pinned_image_on_the_example_file(server_objects) -> None:
    deployment = one(server_objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/ggml-org/llama.cpp:server-b11312"
    assert container["args"][:2] == ["-m", "/models/models/support-bot/support-bot.q8_0.gguf"]
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "2Gi"},
                                      "limits": {"cpu": "2", "memory": "4Gi"}}
    assert container["args"][container["args"].index("-t") + 1] == "2"  # llama.cpp's threads: the CPU limit
    (model, _) = deployment["spec"]["template"]["spec"]["volumes"]
    assert model["persistentVolumeClaim"] == {"claimName": "chat-data", "readOnly": True}
    service = one(server_objects, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_network_policy_example_selects_the_server_pods(server_objects) -> None:
    (policy,) = load_objects((EXAMPLES / "serving-networkpolicy.yaml").read_text())
    validate_object(policy)
    deployment = one(server_objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    (rule,) = policy["spec"]["ingress"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert [p["port"] for p in rule["ports"]] == [p["containerPort"] for p in container["ports"]]
    assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_kubectl_builds_the_objects(tools: Tools, server_objects, tmp_path: Path) -> None:
    """The real kubectl (its kustomize) reads the objects and the example as they are."""
    (tmp_path / "server.yaml").write_text(yaml.safe_dump_all(server_objects))
    (tmp_path / "policy.yaml").write_text((EXAMPLES / "serving-networkpolicy.yaml").read_text())
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "ml", "resources": ["server.yaml", "policy.yaml"]}))
    built = load_objects(tools.kubectl_run("kustomize", str(tmp_path)).stdout)
    assert sorted(o["kind"] for o in built) == ["Deployment", "NetworkPolicy", "Service"]
    for obj in built:
        assert obj["metadata"]["namespace"] == "ml"
        validate_object(obj)
