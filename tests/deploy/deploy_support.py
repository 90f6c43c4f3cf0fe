"""Helpers for the deployment tests: paths, the helm/kubectl runner, object validation."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "chatbot-training"
INSTALL_MANIFEST = REPO_ROOT / "helm" / "install.yaml"
GET_HELM = REPO_ROOT / "scripts" / "get-helm.sh"
BIN_DIR = REPO_ROOT / ".cache" / "bin"
KUBERNETES_VERSION = "1.37"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class Tools:
    helm: Path
    kubectl: Path
    env: dict[str, str]

    def helm_run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.helm), *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def template(self, *args: str, release: str = "chatbot-training",
                 namespace: str = "chatbot-training") -> list[dict[str, Any]]:
        """`helm template` the chart and return the rendered objects."""
        out = self.helm_run("template", release, str(CHART_DIR), "--namespace", namespace, *args)
        return load_objects(out.stdout)

    def kubectl_run(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.kubectl), *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc


def load_objects(text: str) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a multi-document stream."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def kinds_defined_here(objects: Iterable[dict[str, Any]]) -> set[tuple[str, str]]:
    """(group, kind) of every CustomResourceDefinition among `objects`."""
    return {(o["spec"]["group"], o["spec"]["names"]["kind"]) for o in objects
            if o.get("kind") == "CustomResourceDefinition"}


def objects_of_kinds_defined_here(objects: list[dict[str, Any]]) -> list[str]:
    """Objects whose kind a CRD of the same manifest defines: one `kubectl apply` of the
    manifest fails for them on a cluster that does not know the CRD yet."""
    defined = kinds_defined_here(objects)
    return [f"{o['kind']}/{o['metadata'].get('name')}" for o in objects
            if (o.get("apiVersion", "").rpartition("/")[0], o.get("kind")) in defined]


def by_kind(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]


def one(objects: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# Kinds kubernetes-validate has no schema for: custom resources, checked against their CRDs.
CUSTOM_KINDS = {"ServiceMonitor", "ClusterKopfPeering", "KopfPeering", "ChatbotTraining"}


def strict_schema(schema: Any, root: bool = True) -> Any:
    """A CRD schema as kubectl's default field validation (Strict) applies it: unknown
    fields are errors, except where the schema preserves unknown fields. At the root,
    apiVersion, kind and metadata are implied (the API server checks metadata itself)."""
    if root and isinstance(schema, dict):
        implied = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                   "metadata": {"type": "object"}}
        schema = {**schema, "properties": {**implied, **schema.get("properties", {})}}
    if isinstance(schema, list):
        return [strict_schema(s, root=False) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v, root=False) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and "properties" in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in schema
    ):
        out["additionalProperties"] = False
    return out


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of every CRD the chart ships."""
    schemas = {}
    for path in sorted((CHART_DIR / "crds").glob("*.yaml")):
        for crd in load_objects(path.read_text()):
            spec = crd["spec"]
            for version in spec["versions"]:
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                schemas[key] = strict_schema(version["schema"]["openAPIV3Schema"])
    return schemas


def validate_object(obj: dict[str, Any]) -> None:
    """Validate one object: built-in kinds against the Kubernetes 1.37 OpenAPI schemas
    (strict: unknown fields fail), custom resources against the shipped CRDs."""
    import jsonschema
    import kubernetes_validate

    kind = obj["kind"]
    if kind not in CUSTOM_KINDS:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path)
            raise AssertionError(
                f"{kind}/{obj['metadata'].get('name')}: {exc.message} at {path}"
            ) from None
        return
    schema = crd_schemas().get((obj["apiVersion"], kind))
    if schema is None:
        # ServiceMonitor: its CRD comes with the Prometheus Operator; check the shape only.
        assert obj["apiVersion"] == "monitoring.coreos.com/v1", obj["apiVersion"]
        assert obj["spec"]["endpoints"] and obj["spec"]["selector"]["matchLabels"]
        return
    # CRD schemas are OpenAPI v3.0 (boolean exclusiveMinimum): JSON Schema draft 4 semantics.
    jsonschema.Draft4Validator(schema).validate(obj)
