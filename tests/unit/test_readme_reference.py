"""The spec reference in README.md is generated from the schema and must be current."""

from chatbot_api.reference import README, updated_readme


def test_readme_spec_reference_is_current():
    text = README.read_text()
    assert updated_readme(text) == text, "README.md is stale: run python -m chatbot_api.reference --write"


def test_standard_kubernetes_types_are_one_row_each_with_their_reference():
    from chatbot_api.crd import spec_schema
    from chatbot_api.reference import render_reference

    table = render_reference().splitlines()
    fields = [line.split("|")[1].strip().strip("`") for line in table[2:]]
    for path, kind in (("affinity", "core/v1 Affinity"), ("tolerations", "list of [core/v1 Toleration]"),
                       ("resources", "core/v1 ResourceRequirements"), ("serve.tolerations", "core/v1 Toleration"),
                       ("serve.resources", "core/v1 ResourceRequirements"),
                       ("serve.apiKeySecret", "core/v1 SecretKeySelector")):
        row = table[2 + fields.index(path)]
        assert kind in row and "](https://kubernetes.io/docs/reference/kubernetes-api/" in row, row
        assert not [f for f in fields if f.startswith((path + ".", path + "[]."))], f"{path} is expanded"
    # the fields users set stay rows of their own
    assert {"trainingData", "lora.rank", "serve.contextSize", "workspace.size"} <= set(fields)
    # kubectl explain shows the same link: the CRD's descriptions carry it
    schema = spec_schema()
    assert "https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#scheduling" in (
        schema["properties"]["affinity"]["description"])
    assert "core/v1 SecretKeySelector" in (
        schema["properties"]["serve"]["properties"]["apiKeySecret"]["description"])
