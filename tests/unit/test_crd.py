"""The generated CRD: up to date, structural, and validating what the pydantic model validates.

The API server checks the openAPIV3Schema and the CEL rules; here the schema is checked with
jsonschema (Draft 4 semantics, as OpenAPI v3.0 uses: boolean exclusiveMinimum) under
kubectl's strict field validation (unknown fields rejected), and the CEL rules' intent
through the Python twin of every rule (CROSS_FIELD_RULES, CLUSTER_RULES).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest
import yaml

from chatbot_api.corev1 import LABEL_MAP_RULES, TOLERATION_RULES, is_label_key
from chatbot_api.crd import CRD_PATHS, REPO_ROOT, build_crd, render_crd
from chatbot_api.spec import (
    CLUSTER_RULES,
    CROSS_FIELD_RULES,
    GROUP,
    IMMUTABLE_FIELDS,
    KIND,
    MAX_NAME_LENGTH,
    NAME_RULE,
    PLURAL,
    STEPS,
    VERSION,
    ChatbotTrainingSpec,
)
from chatbot_api.status import ChatbotTrainingStatus

MANIFESTS = Path(__file__).resolve().parent / "manifests"
# Rules of the spec's objects (checked by the models too); the name rule is the operator's.
MODEL_RULES = CROSS_FIELD_RULES + CLUSTER_RULES + TOLERATION_RULES + LABEL_MAP_RULES
CRD = build_crd()
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# ----------------------------------------------------------------------------- helpers


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3.0 (Kubernetes flavour) → JSON Schema Draft 4 with strict unknown fields."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: to_json_schema(value) for key, value in node.items()
           if not key.startswith("x-kubernetes-") and key != "nullable"}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


VALIDATOR = jsonschema.Draft4Validator(to_json_schema(SCHEMA))


def schema_errors(manifest: dict) -> list[str]:
    return [f"{'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
            for error in VALIDATOR.iter_errors(manifest)]


def load(path: Path) -> tuple[str, dict]:
    text = path.read_text()
    header = text.splitlines()[0]
    return header, yaml.safe_load(text)


def walk(node: Any, path: str = "") -> Any:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}/{index}")


def minimal(**spec: Any) -> dict:
    return {"trainingData": "/data/chat.jsonl", **spec}


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("path", CRD_PATHS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_committed_crd_is_up_to_date(path: Path):
    assert path.exists(), f"{path} is missing: run python -m chatbot_api.crd --write"
    assert path.read_text() == render_crd(), (
        f"{path.relative_to(REPO_ROOT)} is stale: run python -m chatbot_api.crd --write")


def test_crd_identity_and_printer_columns():
    assert CRD["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert CRD["spec"]["names"]["kind"] == KIND
    version = CRD["spec"]["versions"][0]
    assert version["name"] == VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Step"] == ".status.step"
    assert columns["Loss"] == ".status.metrics.loss"
    assert columns["Progress"] == ".status.progress.percent"
    assert columns["ETA"] == ".status.progress.eta"
    assert columns["Accuracy"] == ".status.metrics.accuracy"
    assert columns["Age"] == ".metadata.creationTimestamp"


def structural_problems(schema: dict) -> list[str]:
    problems = []
    for path, node in walk(schema):
        if not isinstance(node, dict):
            continue
        parent = path.rsplit("/", 2)[-2] if path.count("/") >= 2 else ""
        if not (path == "" or parent == "properties"
                or path.endswith(("/items", "/additionalProperties"))):
            continue  # not a schema node (e.g. the properties map itself)
        for bad in ("$ref", "$defs", "definitions", "title", "const", "discriminator"):
            if bad in node:
                problems.append(f"{path}: {bad}")
        for branch in node.get("anyOf", []) + node.get("oneOf", []):
            if branch.get("type") == "null":
                problems.append(f"{path}: anyOf/oneOf with null")
        if "type" not in node and not (node.get("x-kubernetes-preserve-unknown-fields")
                                       or node.get("x-kubernetes-int-or-string")):
            problems.append(f"{path}: no type")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties together")
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node and not isinstance(node[key], bool):
                problems.append(f"{path}: numeric {key} (not OpenAPI v3.0)")
    return problems


def test_schema_is_structural():
    assert structural_problems(SCHEMA) == []


def test_the_structural_check_catches_problems():
    broken = copy.deepcopy(SCHEMA)
    spec = broken["properties"]["spec"]["properties"]
    spec["batchSize"]["title"] = "Batch Size"
    spec["seed"]["anyOf"] = [{"type": "integer"}, {"type": "null"}]
    spec["learningRate"]["exclusiveMinimum"] = 0
    del spec["packing"]["type"]
    spec["lora"]["properties"]["rank"]["$ref"] = "#/$defs/Rank"
    problems = structural_problems(broken)
    assert len(problems) == 5, problems


def test_immutable_fields_carry_self_equals_old_self():
    properties = SCHEMA["properties"]["spec"]["properties"]
    committed = yaml.safe_load(CRD_PATHS[0].read_text())
    committed_spec = committed["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "spec"]["properties"]
    for field in IMMUTABLE_FIELDS:
        for props in (properties, committed_spec):
            rules = [v["rule"] for v in props[field].get("x-kubernetes-validations", [])]
            assert "self == oldSelf" in rules, field
    mutable = set(properties) - set(IMMUTABLE_FIELDS)
    assert {"suspend", "evaluation", "export", "resources", "steps", "nodeSelector"} <= mutable
    for field in mutable:
        rules = [v["rule"] for v in properties[field].get("x-kubernetes-validations", [])]
        assert "self == oldSelf" not in rules, field


def test_cel_rules_in_the_crd_are_the_models_rules():
    rules = SCHEMA["properties"]["spec"]["x-kubernetes-validations"]
    assert rules == [{"rule": r.cel, "message": r.message}
                     for r in CROSS_FIELD_RULES + CLUSTER_RULES]
    toleration = SCHEMA["properties"]["spec"]["properties"]["tolerations"]
    assert toleration["items"]["x-kubernetes-validations"] == [
        {"rule": r.cel, "message": r.message} for r in TOLERATION_RULES]
    assert toleration["maxItems"]  # bounds the rules' estimated cost
    assert SCHEMA["x-kubernetes-validations"] == [{"rule": NAME_RULE.cel,
                                                   "message": NAME_RULE.message}]
    spec = SCHEMA["properties"]["spec"]["properties"]
    for label_map in (spec["nodeSelector"], spec["serve"]["properties"]["nodeSelector"]):
        assert label_map["x-kubernetes-validations"] == [
            {"rule": r.cel, "message": r.message} for r in LABEL_MAP_RULES]
        assert label_map["maxProperties"] == 64  # bounds the rule's estimated cost


def test_the_name_rule_keeps_every_derived_name_a_valid_label_value():
    from chatbot_operator.manifests import config_map_name, job_name, owned_claim_name

    longest = "a" * MAX_NAME_LENGTH
    assert MAX_NAME_LENGTH == 53
    assert NAME_RULE.holds(longest) and not NAME_RULE.holds(longest + "b")
    derived = [job_name(longest, step) for step in STEPS]
    derived += [config_map_name(longest), owned_claim_name(longest)]
    assert max(len(name) for name in derived) == 63
    assert all(name.startswith(longest + "-") for name in derived)  # never shortened


@pytest.mark.parametrize("where", ["nodeSelector", "serve.nodeSelector"])
def test_label_map_keys_are_checked_at_apply_time(where: str):
    """A structural schema has no propertyNames: the key format is a CEL rule on the map."""
    def spec_with(labels):
        return minimal(nodeSelector=labels) if where == "nodeSelector" else minimal(serve={"nodeSelector": labels})

    rule = cel_program(LABEL_MAP_RULES[0].cel)
    good = {"kubernetes.io/arch": "amd64", "nvidia.com/gpu.product": "H100", "zone": "a",
            "a" * 253 + "/" + "b" * 63: "x"}
    for labels in ({}, good, {"bad key!": "x"}, {"-x": "y"}, {"kubernetes.io/": "y"}, {"x" * 64: "y"},
                   {"Upper.Case/x": "y"}):
        expected = all(is_label_key(k) for k in labels)
        assert rule(labels) is expected, labels
        manifest = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "x"},
                    "spec": spec_with(labels)}
        assert schema_errors(manifest) == []
        if expected:
            ChatbotTrainingSpec.model_validate(spec_with(labels))
        else:
            with pytest.raises(pydantic.ValidationError, match="is not a label key"):
                ChatbotTrainingSpec.model_validate(spec_with(labels))
    assert "propertyNames" not in str(SCHEMA)


def test_affinity_match_labels_keys_are_checked_by_the_model():
    term = {"labelSelector": {"matchLabels": {"bad key!": "x"}}, "topologyKey": "kubernetes.io/hostname"}
    with pytest.raises(pydantic.ValidationError, match="'bad key!' is not a label key"):
        ChatbotTrainingSpec.model_validate(minimal(affinity={"podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [term]}}))
    term["labelSelector"]["matchLabels"] = {"app.kubernetes.io/name": "x"}
    ChatbotTrainingSpec.model_validate(minimal(affinity={"podAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [term]}}))


def test_status_schema_accepts_what_the_operator_writes():
    status = {
        "phase": "Succeeded", "step": "export", "reason": "Succeeded", "message": "ok",
        "observedGeneration": 3, "startTime": "2026-01-01T00:00:00Z",
        "completionTime": "2026-01-01T01:00:00Z", "workspaceClaim": "bot-workspace",
        "configMap": "bot-config",
        "steps": {"train": {"phase": "Succeeded", "jobName": "bot-train", "attempts": 1,
                            "summary": {"train_loss": 0.4, "anything": {"nested": [1]}}}},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded",
                        "message": "", "lastTransitionTime": "2026-01-01T01:00:00Z",
                        "observedGeneration": 3}],
        "metrics": {"loss": 0.15, "accuracy": 0.92, "perplexity": 1.16, "trainLoss": 0.4},
        "model": {"path": "pvc://bot-workspace/export/bot.q8_0.gguf", "format": "gguf",
                  "sizeMb": 130.5, "files": [{"path": "pvc://x/a.gguf", "quantization": "f16",
                                              "sizeMb": 1.0}]},
    }
    manifest = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "bot"},
                "spec": minimal(), "status": status}
    assert schema_errors(manifest) == []
    ChatbotTrainingStatus.model_validate(status)
    broken = copy.deepcopy(manifest)
    broken["status"]["phase"] = "Done"
    assert any("'Done' is not one of" in e for e in schema_errors(broken))


# ----------------------------------------------------------------------------- manifests


def example_manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted((REPO_ROOT / "examples").glob("**/*.yaml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and doc.get("kind") == KIND:
                found.append((f"{path.relative_to(REPO_ROOT)}#{index}", doc))
    return found


@pytest.mark.parametrize("name, manifest", example_manifests() or [("none", None)],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_example_manifests_are_valid(name: str, manifest: dict | None):
    if manifest is None:
        return  # no example ChatbotTraining in examples/
    assert manifest["apiVersion"] == f"{GROUP}/{VERSION}"
    assert schema_errors(manifest) == []
    ChatbotTrainingSpec.model_validate(manifest["spec"])


VALID = sorted(MANIFESTS.glob("valid-*.yaml"))
INVALID = sorted(MANIFESTS.glob("invalid-*.yaml"))
CEL = sorted(MANIFESTS.glob("cel-*.yaml"))


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_manifests_pass_schema_and_model(path: Path):
    _, manifest = load(path)
    assert schema_errors(manifest) == []
    ChatbotTrainingSpec.model_validate(manifest["spec"])


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_manifests_fail_schema_and_model(path: Path):
    header, manifest = load(path)
    expected = header.removeprefix("# error:").strip()
    errors = schema_errors(manifest)
    assert errors, f"{path.name} passed the schema"
    assert any(expected in error for error in errors), errors
    if "spec" in manifest and "coerces" not in path.read_text():
        with pytest.raises(pydantic.ValidationError):
            ChatbotTrainingSpec.model_validate(manifest["spec"])


@pytest.mark.parametrize("path", CEL, ids=lambda p: p.name)
def test_cel_violations_pass_the_schema_but_not_the_rules(path: Path):
    header, manifest = load(path)
    message = header.removeprefix("# rule:").strip()
    assert schema_errors(manifest) == []  # only the CEL rule catches it
    rules = {r.message: r for r in MODEL_RULES}
    assert message in rules
    with pytest.raises(pydantic.ValidationError, match=message):
        ChatbotTrainingSpec.model_validate(manifest["spec"])


def test_every_rule_has_a_manifest_that_breaks_it():
    covered = {load(path)[0].removeprefix("# rule:").strip() for path in CEL}
    assert covered == {r.message for r in MODEL_RULES}


# ----------------------------------------------------------------------------- rules


RULE_CASES = {
    "microBatchSize must not exceed batchSize": (
        [minimal(batchSize=8, microBatchSize=8), minimal(batchSize=8)],
        minimal(batchSize=4, microBatchSize=8)),
    "batchSize must be a multiple of microBatchSize": (
        [minimal(batchSize=8, microBatchSize=2), minimal(batchSize=8, microBatchSize=1)],
        minimal(batchSize=8, microBatchSize=3)),
    "warmupSteps must be less than trainingSteps": (
        [minimal(trainingSteps=100, warmupSteps=99), minimal(trainingSteps=100, warmupSteps=0)],
        minimal(trainingSteps=100, warmupSteps=100)),
    "trainingSteps and epochs are mutually exclusive: set one of them, epochs counts passes over "
    "the packed training data": (
        [minimal(trainingSteps=100), minimal(epochs=2.5), minimal(epochs=3, warmupSteps=5), minimal()],
        minimal(trainingSteps=100, epochs=3)),
    "workspace.existingClaim and workspace.storageClassName are mutually exclusive": (
        [minimal(workspace={"existingClaim": "a"}), minimal(workspace={"storageClassName": "b"})],
        minimal(workspace={"existingClaim": "a", "storageClassName": "b"})),
    "serve.quantization must be one of export.quantizations: only exported files can be served": (
        [minimal(serve={"enabled": True, "quantization": "q8_0"}),
         minimal(serve={"quantization": "q4_0"}, export={"quantizations": ["q4_0"]}),
         minimal(serve={"enabled": True})],
        minimal(serve={"enabled": True, "quantization": "q4_0"})),
    "serve.contextSize / serve.parallel must be at least 256: each parallel slot gets that many "
    "tokens of context": (
        [minimal(serve={"enabled": True}), minimal(serve={"contextSize": 2048, "parallel": 8}),
         minimal(serve={"parallel": 16, "contextSize": 4096})],
        minimal(serve={"enabled": True, "parallel": 32})),
    "nodes > 1 needs a workspace every node can mount: set workspace.accessMode to ReadWriteMany, "
    "with a StorageClass that provides it, or workspace.existingClaim to a ReadWriteMany claim": (
        [minimal(nodes=2, workspace={"accessMode": "ReadWriteMany"}),
         minimal(nodes=2, workspace={"existingClaim": "shared"}), minimal(nodes=1)],
        minimal(nodes=2, workspace={"accessMode": "ReadWriteOnce"})),
}


RULE_CASES["batchSize must be a multiple of the number of training processes, nodes × gpu.count: "
           "each process takes an equal share of every batch"] = (
    [minimal(batchSize=8, gpu={"count": 4}), minimal(batchSize=9, gpu={"count": 0}), minimal(batchSize=9),
     minimal(batchSize=12, gpu={"count": 3}, nodes=2, workspace={"accessMode": "ReadWriteMany"}),
     minimal(batchSize=6, nodes=3, gpu={"count": 0}, workspace={"accessMode": "ReadWriteMany"})],
    minimal(batchSize=8, gpu={"count": 3}))
RULE_CASES_MORE_FAILING = [
    minimal(batchSize=8, gpu={"count": 2}, nodes=3, workspace={"accessMode": "ReadWriteMany"}),
    minimal(gpu={"count": 3}),  # the default batchSize, 8
]


def test_every_rule_has_cases():
    assert set(RULE_CASES) == {r.message for r in CROSS_FIELD_RULES + CLUSTER_RULES}


@pytest.mark.parametrize("message", sorted(RULE_CASES))
def test_rule_holds_and_breaks_like_the_model(message: str):
    rule = next(r for r in CROSS_FIELD_RULES + CLUSTER_RULES if r.message == message)
    passing, failing = RULE_CASES[message]
    for spec in passing:
        model = ChatbotTrainingSpec.model_validate(spec)
        assert rule.holds(model)
    with pytest.raises(pydantic.ValidationError) as error:
        ChatbotTrainingSpec.model_validate(failing)
    assert message in str(error.value)
    # The same holds for the camelCase manifest the API server sees: the schema accepts it.
    manifest = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "x"},
                "spec": failing}
    assert schema_errors(manifest) == []


def test_immutable_fields_are_real_fields():
    properties = SCHEMA["properties"]["spec"]["properties"]
    assert set(IMMUTABLE_FIELDS) <= set(properties)


# ----------------------------------------------------------------------------- CEL itself


def cel_program(rule: str):
    """A CEL rule compiled with cel-python (RE2 regular expressions, as the API server)."""
    import celpy

    env = celpy.Environment()
    program = env.program(env.compile(rule))
    return lambda value: bool(program.evaluate({"self": celpy.json_to_cel(value)}))


def with_defaults(schema: dict, value: Any) -> Any:
    """The object as the API server validates it: structural defaults applied first."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, sub in schema["properties"].items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = with_defaults(sub, out[name])
        return out
    if isinstance(value, list) and "items" in schema:
        return [with_defaults(schema["items"], item) for item in value]
    return value


@pytest.mark.parametrize("message", sorted(RULE_CASES))
def test_each_cel_rule_decides_like_its_python_twin(message: str):
    rule = next(r for r in CROSS_FIELD_RULES + CLUSTER_RULES if r.message == message)
    program = cel_program(rule.cel)
    spec_schema = SCHEMA["properties"]["spec"]
    passing, failing = RULE_CASES[message]
    failing = [failing] + (RULE_CASES_MORE_FAILING if message.startswith("batchSize must be a multiple of the number")
                           else [])
    for spec in passing:
        assert program(with_defaults(spec_schema, spec)), spec
    for spec in failing:
        assert not program(with_defaults(spec_schema, spec)), spec
        with pytest.raises(pydantic.ValidationError, match=message):
            ChatbotTrainingSpec.model_validate(spec)


@pytest.mark.parametrize("path", CEL, ids=lambda p: p.name)
def test_cel_manifests_break_their_rule_in_cel(path: Path):
    header, manifest = load(path)
    message = header.removeprefix("# rule:").strip()
    rule = next(r for r in MODEL_RULES if r.message == message)
    spec = with_defaults(SCHEMA["properties"]["spec"], manifest["spec"])
    if rule in TOLERATION_RULES:
        targets = spec["tolerations"]
    elif rule in LABEL_MAP_RULES:
        targets = [spec["nodeSelector"], spec["serve"]["nodeSelector"]]
    else:
        targets = [spec]
    assert not all(cel_program(rule.cel)(target) for target in targets)
