"""The Helm chart, rendered by the real helm binary and validated against Kubernetes 1.37."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy_support import (
    CHART_DIR,
    REPO_ROOT,
    Tools,
    by_kind,
    kinds_defined_here,
    load_objects,
    objects_of_kinds_defined_here,
    one,
    validate_object,
)

OPERATOR = "chatbot-training-operator"

NON_DEFAULT_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/ml/chatbot-operator", "tag": "1.2.3"},
    "trainer": {
        "image": {
            "repository": "registry.example.com/ml/chatbot-trainer",
            "digest": "sha256:" + "ab" * 32,
            "pullPolicy": "Always",
        },
        "nodeSelector": {"node.kubernetes.io/instance-type": "gpu-a100", "pool": "train"},
        "tolerations": [{"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}],
        "runAsUser": 2000,
    },
    "server": {"image": {"repository": "registry.example.com/ml/llama.cpp", "tag": "server-b9000"},
               "cudaImage": {"repository": "registry.example.com/ml/llama.cpp",
                             "tag": "server-cuda-b9000", "digest": "sha256:" + "cd" * 32}},
    "watchNamespaces": ["ml", "ml-staging"],
    "replicaCount": 2,
    "peering": {"name": "ml-bots"},
    "resyncSeconds": 30,
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "imagePullSecrets": [{"name": "regcred"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "podAnnotations": {"example.com/team": "ml"},
    "extraEnv": [{"name": "TZ", "value": "UTC"}],
}


@pytest.fixture(scope="module")
def default_objects(tools: Tools) -> list[dict[str, Any]]:
    return tools.template()


@pytest.fixture(scope="module")
def custom_objects(tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    values = tmp_path_factory.mktemp("values") / "values.yaml"
    values.write_text(yaml.safe_dump(NON_DEFAULT_VALUES))
    return tools.template("--values", str(values), release="ml-bots", namespace="ml-system")


def rbac_rules() -> list[dict[str, Any]]:
    from chatbot_operator.rbac import RBAC_RULES

    return [dict(rule) for rule in RBAC_RULES]


def normalise(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rules compared as data: keys with list values, in their given order."""
    return [{k: list(v) for k, v in rule.items() if v not in (None, [])} for rule in rules]


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# ---------------------------------------------------------------------------- lint & schema


def test_helm_lint_strict(tools: Tools) -> None:
    proc = tools.helm_run("lint", "--strict", str(CHART_DIR))
    assert "0 chart(s) failed" in proc.stdout


def test_helm_lint_strict_with_non_default_values(tools: Tools, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(NON_DEFAULT_VALUES))
    tools.helm_run("lint", "--strict", str(CHART_DIR), "--values", str(values))


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "replicaCount=-1"],
        ["--set", "replicaCount=two"],
        ["--set", "image.pullPolicy=Sometimes"],
        ["--set", "trainer.image.repository="],
        ["--set", "peering.priority=high"],
        ["--set", "resyncSeconds=0"],
        ["--set", "watchNamespaces[0]=Not_A_Namespace"],
        ["--set", "metrics.port=70000"],
        ["--set", "trainer.tolerations[0].effect=Sometimes"],
        ["--set-json", 'trainer.nodeSelector={"pool": 1}'],
        ["--set", "replicas=2"],  # misspelt key: unknown keys are rejected
        ["--set", "metrics.serviceMonitor.interval=often"],
        ["--set", "resources.limits.memory=lots"],
        ["--set", "server.image.tag="],  # the llama.cpp server image is always pinned
    ],
    ids=lambda args: args[-1],
)
def test_bad_values_fail_schema(tools: Tools, bad: list[str]) -> None:
    proc = tools.helm_run("template", "x", str(CHART_DIR), *bad, check=False)
    assert proc.returncode != 0, f"helm accepted {bad}:\n{proc.stdout[:500]}"
    assert "schema" in proc.stderr.lower(), proc.stderr


def test_values_schema_accepts_default_values() -> None:
    import jsonschema

    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART_DIR / "values.yaml").read_text()))


def test_service_monitor_needs_service(tools: Tools) -> None:
    proc = tools.helm_run(
        "template", "x", str(CHART_DIR),
        "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false",
        check=False,
    )
    assert proc.returncode != 0 and "metrics.service.enabled" in proc.stderr


def test_server_pod_monitor_scrapes_the_model_servers_with_their_key(tools: Tools) -> None:
    from chatbot_operator import serving

    objects = tools.template("--set", "metrics.servers.podMonitor.enabled=true",
                             "--set", "metrics.servers.podMonitor.namespaces={ml}",
                             "--set", "metrics.servers.podMonitor.apiKeySecret.name=bot-api",
                             "--set", "metrics.servers.podMonitor.apiKeySecret.key=token")
    (monitor,) = [o for o in objects if o["kind"] == "PodMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    # It selects exactly the server pods the operator labels.
    pod_labels = serving.selector("support-bot")
    assert selector.items() <= pod_labels.items() and "app.kubernetes.io/instance" not in selector
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["authorization"] == {"type": "Bearer",
                                         "credentials": {"name": "bot-api", "key": "token"}}
    assert not [o for o in tools.template() if o["kind"] == "PodMonitor"]  # off by default


# ---------------------------------------------------------------------------- validity


@pytest.mark.parametrize("which", ["default_objects", "custom_objects"])
def test_every_object_validates_against_kubernetes_1_37(which: str, request: pytest.FixtureRequest) -> None:
    objects = request.getfixturevalue(which)
    assert objects
    for obj in objects:
        validate_object(obj)


def test_default_render_objects(default_objects: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in default_objects)
    assert kinds == sorted([
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment",
    ])
    for obj in default_objects:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "chatbot-training", obj["kind"]


def test_chart_crds_equal_generated_crds() -> None:
    top = {p.name: p.read_bytes() for p in (REPO_ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART_DIR / "crds").glob("*.yaml")}
    assert top, "crds/ is empty"
    for name, content in top.items():
        assert chart.get(name) == content, f"helm/chatbot-training/crds/{name} differs from crds/{name}"
    assert set(chart) - set(top) == {"kopfpeerings.kopf.dev.yaml"}


@pytest.mark.parametrize("values", [[], ["--set", "watchNamespaces={ml,ml-staging}"],
                                    ["--set", "peering.name="]])
def test_helm_template_applies_in_one_go(tools: Tools, values: list[str]) -> None:
    """`helm template --include-crds … | kubectl apply -f -` on a fresh cluster: no object may
    be of a kind that a CRD of the same output defines (the operator creates its peering
    objects itself)."""
    objects = tools.template("--include-crds", *values)
    assert kinds_defined_here(objects) >= {("kopf.dev", "ClusterKopfPeering"),
                                           ("chatbot.dev", "ChatbotTraining")}
    assert objects_of_kinds_defined_here(objects) == []


def test_kopf_peering_crds(tools: Tools) -> None:
    out = tools.helm_run("show", "crds", str(CHART_DIR)).stdout
    crds = {c["metadata"]["name"]: c for c in load_objects(out)}
    assert {"chatbottrainings.chatbot.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= set(crds)
    assert crds["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    assert crds["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"
    for crd in crds.values():
        validate_object(crd)
        for version in crd["spec"]["versions"]:
            assert version["served"] and version["storage"]


# ---------------------------------------------------------------------------- RBAC


def test_cluster_role_rules_equal_operator_rbac(default_objects: list[dict[str, Any]]) -> None:
    role = one(default_objects, "ClusterRole", OPERATOR)
    assert normalise(role["rules"]) == normalise(rbac_rules())


def test_cluster_mode_binds_cluster_wide(default_objects: list[dict[str, Any]]) -> None:
    binding = one(default_objects, "ClusterRoleBinding", OPERATOR)
    sa = one(default_objects, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": OPERATOR}
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "chatbot-training"}
    ]
    assert not by_kind(default_objects, "RoleBinding")


def test_namespaced_mode_binds_per_namespace(custom_objects: list[dict[str, Any]]) -> None:
    name = "ml-bots-chatbot-training-operator"
    role = one(custom_objects, "ClusterRole", name)
    assert normalise(role["rules"]) == normalise(rbac_rules())
    bindings = by_kind(custom_objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml", "ml-staging"]
    for binding in bindings:
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"][0]["namespace"] == "ml-system"
    # Cluster-wide, only the rules a RoleBinding cannot grant (cluster-scoped resources).
    cluster_bindings = by_kind(custom_objects, "ClusterRoleBinding")
    assert [b["roleRef"]["name"] for b in cluster_bindings] in ([], [f"{name}-cluster"])
    cluster_scoped = {"namespaces", "customresourcedefinitions", "clusterkopfpeerings"}
    if cluster_bindings:
        narrow = one(custom_objects, "ClusterRole", f"{name}-cluster")
        allowed = {
            (group, resource, verb)
            for rule in rbac_rules() for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]
        }
        for rule in narrow["rules"]:
            for resource in rule["resources"]:
                assert resource in cluster_scoped | {"nodes", "persistentvolumes", "storageclasses",
                                                     "priorityclasses", "runtimeclasses"}
                for group in rule["apiGroups"]:
                    for verb in rule["verbs"]:
                        assert (group, resource, verb) in allowed


# ---------------------------------------------------------------------------- Deployment


def test_deployment_security_and_probes(default_objects: list[dict[str, Any]]) -> None:
    deployment = one(default_objects, "Deployment", OPERATOR)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http-metrics": 8080, "http-health": 8081}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http-health"}, probe
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == one(default_objects, "ServiceAccount")["metadata"]["name"]


# Settings the chart leaves to the operator unless a value asks for them.
OPTIONAL_SETTINGS = {"CHATBOT_PEERING_PRIORITY"}  # unset: each replica picks a random priority


def test_deployment_env_matches_operator_settings(
    default_objects: list[dict[str, Any]],
    custom_objects: list[dict[str, Any]],
    settings_env_names: set[str],
) -> None:
    env = env_of(one(default_objects, "Deployment", OPERATOR))
    chart_names = {name for name in env if name.startswith("CHATBOT_")}
    missing = settings_env_names - chart_names - OPTIONAL_SETTINGS
    assert not missing, f"operator settings the chart does not set: {missing}"
    assert chart_names <= settings_env_names, f"not read by the operator: {chart_names - settings_env_names}"
    custom_names = set(env_of(one(custom_objects, "Deployment")))
    assert settings_env_names - OPTIONAL_SETTINGS <= custom_names


def test_deployment_env_parses_as_operator_config(
    default_objects: list[dict[str, Any]], custom_objects: list[dict[str, Any]]
) -> None:
    """The operator accepts what the chart renders, and reads the values it was given."""
    from chatbot_operator.settings import OperatorConfig, resync_seconds_from_env

    env = env_of(one(default_objects, "Deployment", OPERATOR))
    assert env["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    config = OperatorConfig.from_env({k: v for k, v in env.items() if isinstance(v, str)})
    default = OperatorConfig()
    assert config.namespaces == () and config.clusterwide
    assert (config.metrics_port, config.health_port) == (default.metrics_port, default.health_port)
    assert config.peering_name == default.peering_name
    assert config.peering_priority is None
    assert config.step_uid == default.step_uid
    assert resync_seconds_from_env(env) == resync_seconds_from_env({})
    assert config.trainer_image == default.trainer_image, "chart and operator disagree on the trainer image"
    assert (config.server_image, config.server_cuda_image) == (
        default.server_image, default.server_cuda_image), "chart and operator disagree on the server"
    assert config.default_node_selector == {}
    assert list(config.default_tolerations) == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]

    env = env_of(one(custom_objects, "Deployment"))
    config = OperatorConfig.from_env({k: v for k, v in env.items() if isinstance(v, str)})
    trainer = NON_DEFAULT_VALUES["trainer"]
    assert config.namespaces == ("ml", "ml-staging")
    assert config.trainer_image == "registry.example.com/ml/chatbot-trainer@sha256:" + "ab" * 32
    assert config.image_pull_policy == "Always"
    assert config.peering_name == "ml-bots" and config.peering_priority is None
    assert config.step_uid == 2000 and resync_seconds_from_env(env) == 30
    assert dict(config.default_node_selector) == trainer["nodeSelector"]
    assert config.server_image == "registry.example.com/ml/llama.cpp:server-b9000"
    assert config.server_cuda_image == "registry.example.com/ml/llama.cpp@sha256:" + "cd" * 32
    assert list(config.default_tolerations) == trainer["tolerations"]


def test_peering_modes(tools: Tools) -> None:
    from chatbot_operator.__main__ import kopf_options
    from chatbot_operator.settings import OperatorConfig

    def config(*args: str) -> OperatorConfig:
        env = env_of(one(tools.template(*args), "Deployment"))
        return OperatorConfig.from_env({k: v for k, v in env.items() if isinstance(v, str)})

    # A fixed priority (one replica), e.g. to let a debugging operator take over.
    assert config("--set", "peering.priority=7").peering_priority == 7
    # No peering: standalone, and no peering objects.
    assert config("--set", "peering.name=").standalone
    assert not [o for o in tools.template("--set", "peering.name=") if "Peering" in o["kind"]]
    assert kopf_options(config("--set", "peering.name="))["standalone"] is True
    # Replicas need peering with distinct (random) priorities.
    for bad in (["--set", "peering.name="], ["--set", "peering.priority=1"]):
        proc = tools.helm_run("template", "x", str(CHART_DIR), "--set", "replicaCount=2", *bad, check=False)
        assert proc.returncode != 0 and "replicaCount > 1" in proc.stderr


def test_non_default_values(custom_objects: list[dict[str, Any]]) -> None:
    deployment = one(custom_objects, "Deployment", "ml-bots-chatbot-training-operator")
    assert deployment["metadata"]["namespace"] == "ml-system"
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/ml/chatbot-operator:1.2.3"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {"example.com/team": "ml"}
    env = env_of(deployment)
    assert env["CHATBOT_NAMESPACES"] == "ml,ml-staging"
    assert env["TZ"] == "UTC"
    assert json.loads(env["CHATBOT_DEFAULT_NODE_SELECTOR"]) == NON_DEFAULT_VALUES["trainer"]["nodeSelector"]
    # The peering objects carry the name the operator looks for.
    for peering in by_kind(custom_objects, "KopfPeering"):
        assert peering["metadata"]["name"] == env["CHATBOT_PEERING_NAME"] == "ml-bots"


def test_metrics_service_and_service_monitor(custom_objects: list[dict[str, Any]]) -> None:
    service = one(custom_objects, "Service")
    deployment = one(custom_objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"][0]["targetPort"] == "http-metrics"
    monitor = one(custom_objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert all(service["metadata"]["labels"].get(k) == v for k, v in selector.items())
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml-system"]}


def test_notes_tell_how_to_start_and_watch(tools: Tools) -> None:
    # `helm install --dry-run=client` renders NOTES.txt without a cluster.
    proc = tools.helm_run(
        "install", "bots", str(CHART_DIR), "--dry-run=client", "--namespace", "ml-system",
        "--set", "watchNamespaces={ml}",
    )
    notes = proc.stdout.split("NOTES:", 1)[1]
    minimal = yaml.safe_load((REPO_ROOT / "examples" / "chatbottraining-minimal.yaml").read_text())
    assert "It serves ChatbotTrainings in: ml." in notes
    assert "kubectl -n ml apply -f examples/chatbottraining-minimal.yaml" in notes
    assert "kubectl -n ml get chatbottrainings --watch" in notes
    assert f"describe chatbottraining {minimal['metadata']['name']}" in notes
    assert "rollout status deployment/bots-chatbot-training-operator" in notes
