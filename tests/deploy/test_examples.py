"""examples/: the ChatbotTraining manifests and the GitOps kustomization.

Each example must pass both gates a user meets: the CRD's OpenAPI schema (what the API server
checks on `kubectl apply`) and the pydantic spec model (what the operator and the trainer check).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from chatbot_api.spec import GROUP, KIND, STEPS, VERSION, ChatbotTrainingSpec
from deploy_support import (
    REPO_ROOT,
    Tools,
    by_kind,
    load_objects,
    one,
    strict_schema,
    validate_object,
)

EXAMPLES = REPO_ROOT / "examples"
CRD_FILE = REPO_ROOT / "crds" / f"chatbottrainings.{GROUP}.yaml"
SEED_FIELDS = {"trainingData", "modelType", "trainingSteps", "batchSize", "learningRate"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def training_manifests() -> list[Path]:
    paths = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        if any(doc.get("kind") == KIND for doc in load_objects(path.read_text())):
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    (crd,) = load_objects(CRD_FILE.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
    schema = version["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator.check_schema(schema)
    # metadata is validated by the API server itself; the rest strictly, like kubectl apply.
    return strict_schema(schema)


def test_both_examples_exist() -> None:
    names = {p.name for p in training_manifests()}
    assert {"chatbottraining.yaml", "chatbottraining-minimal.yaml"} <= names


@pytest.mark.parametrize("path", training_manifests(), ids=lambda p: p.name)
def test_example_validates_against_crd_and_model(path: Path, crd_schema: dict[str, Any]) -> None:
    (obj,) = load_objects(path.read_text())
    assert obj["apiVersion"] == f"{GROUP}/{VERSION}"
    assert obj["kind"] == KIND
    # The operator names Jobs <name>-<step>: they must stay valid DNS labels.
    name = obj["metadata"]["name"]
    longest = max(len(f"{name}-{step}") for step in STEPS)
    assert DNS_LABEL.match(name) and longest <= 63, name
    jsonschema.Draft4Validator(crd_schema).validate(obj)
    spec = ChatbotTrainingSpec.model_validate(obj["spec"])
    # Every key the example sets is a real field (no typos that a default would hide).
    assert spec.to_api().keys() >= obj["spec"].keys()


def test_validators_reject_a_bad_spec(crd_schema: dict[str, Any]) -> None:
    """The two gates used above do reject bad specs."""
    (obj,) = load_objects((EXAMPLES / "chatbottraining.yaml").read_text())
    for change in ({"batchSize": 0}, {"learningRate": 0}, {"batchSizes": 8},
                   {"export": {"quantizations": ["q5_k"]}}):
        bad = copy.deepcopy(obj)
        bad["spec"].update(change)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft4Validator(crd_schema).validate(bad)
        with pytest.raises(ValueError):
            ChatbotTrainingSpec.model_validate(bad["spec"])


def test_minimal_example_has_only_the_seed_inputs() -> None:
    (obj,) = load_objects((EXAMPLES / "chatbottraining-minimal.yaml").read_text())
    assert set(obj["spec"]) == SEED_FIELDS
    # The data set it names is baked into the trainer image from examples/data/.
    path = obj["spec"]["trainingData"]
    assert path.startswith("/opt/chatbot/examples/data/")
    assert (EXAMPLES / "data" / Path(path).name).is_file()


def test_full_example_covers_the_settings_users_expect() -> None:
    (obj,) = load_objects((EXAMPLES / "chatbottraining.yaml").read_text())
    spec = obj["spec"]
    assert SEED_FIELDS <= set(spec)
    assert spec["trainingData"] == "pvc://chat-data/support.jsonl"
    assert spec["trainingSteps"] == 1000 and spec["batchSize"] == 8 and spec["learningRate"] == 0.0001
    for key in ("lora", "evaluation", "export", "gpu", "nodeSelector", "tolerations", "resources"):
        assert spec.get(key), key
    assert spec["gpu"]["count"] == 1
    assert spec["evaluation"]["maxLoss"] and spec["evaluation"]["minAccuracy"]
    assert {"q8_0", "f16"} <= set(spec["export"]["quantizations"])


# ---------------------------------------------------------------------------- kustomization


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / "kustomization.yaml").read_text())


def test_kustomization_references_files_that_exist() -> None:
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    for resource in k["resources"]:
        assert (EXAMPLES / resource).is_file(), resource
    for generator in k.get("configMapGenerator", []):
        for entry in generator.get("files", []):
            source = entry.split("=", 1)[-1]
            assert (EXAMPLES / source).is_file(), source
    assert "chatbottraining.yaml" in k["resources"]


@pytest.fixture(scope="module")
def built(tools: Tools) -> list[dict[str, Any]]:
    """`kubectl kustomize examples/` (kustomize v5 inside kubectl 1.37, offline)."""
    return load_objects(tools.kubectl_run("kustomize", str(EXAMPLES)).stdout)


def test_kustomize_build_validates(built: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in built)
    assert kinds == sorted(["ConfigMap", "PersistentVolumeClaim", "Job", KIND])
    for obj in built:
        validate_object(obj)
    training = one(built, KIND)
    ChatbotTrainingSpec.model_validate(training["spec"])


def test_kustomize_build_is_consistent(built: list[dict[str, Any]]) -> None:
    """The training reads the claim the kustomization creates, which the Job fills from the
    generated ConfigMap (under its hashed name)."""
    training = one(built, KIND)
    claim = one(built, "PersistentVolumeClaim")["metadata"]["name"]
    config_map = one(built, "ConfigMap")
    data_uri = training["spec"]["trainingData"]
    assert data_uri.startswith(f"pvc://{claim}/")
    assert training["spec"]["outputPath"].startswith(f"pvc://{claim}/")
    filename = data_uri.split("/", 3)[3]
    assert filename in config_map["data"]
    assert config_map["data"][filename] == (EXAMPLES / "data" / "support.jsonl").read_text()
    pod = one(built, "Job")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {v.get("configMap", {}).get("name") for v in volumes.values()} >= {config_map["metadata"]["name"]}
    assert {v.get("persistentVolumeClaim", {}).get("claimName") for v in volumes.values()} >= {claim}
    (container,) = pod["containers"]
    assert f"/out/{filename}" in " ".join(container["command"])
    # Non-root, like everything the product runs.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert ":" in container["image"] and not container["image"].endswith(":latest")


def test_data_objects_can_be_applied_first(built: list[dict[str, Any]]) -> None:
    """README: `kubectl apply -k examples/ -l chatbot.dev/example-part=data` loads the data,
    then the ChatbotTraining follows; Argo CD orders them by sync wave."""
    data = [o for o in built if o["metadata"].get("labels", {}).get("chatbot.dev/example-part") == "data"]
    assert sorted(o["kind"] for o in data) == ["ConfigMap", "Job", "PersistentVolumeClaim"]
    waves = {o["kind"]: int(o["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", 0))
             for o in built}
    assert waves["Job"] < waves[KIND]
    assert not by_kind(data, KIND)


def test_readme_explains_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for name in ("chatbottraining.yaml", "chatbottraining-minimal.yaml", "kustomization.yaml",
                 "kubectl get chatbottrainings", "chatbot.dev/example-part=data",
                 "helm/install.yaml", "serving-networkpolicy.yaml"):
        assert name in readme, name
