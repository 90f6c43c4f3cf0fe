"""Kubernetes formats and core/v1 types that ChatbotTraining fields pass on to the step pods.

The patterns are the ones the API server applies to the same fields of a Pod, Job or claim
(apimachinery's validation: DNS-1123 labels and subdomains, qualified names for label keys,
label values, resource quantities), so a value that a Job would be refused for is refused
when the ChatbotTraining is applied. They go into the CRD's schema through the pydantic
JSON schema. The format of a map's keys (nodeSelector), which a structural schema cannot
hold as `propertyNames`, is a CEL rule on the map itself (`LABEL_MAP_RULES`, within the API
server's cost budget because the map has at most 64 keys), with the same check in the model.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, StringConstraints, model_validator

from chatbot_api.base import ApiModel, CrossFieldRule, broken_rules, cel_validations

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# An optional DNS-subdomain prefix and a name of at most 63 characters (lengths: see below).
LABEL_KEY = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
             r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
QUANTITY = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
            r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
# A reference to a claim: pvc://<claim>/<path>, the claim a DNS-1123 label (it is also a
# directory name and a volume's claimName).
PVC_URI = r"pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/+[^/].*"
# A path in the image: anything without a URI scheme (a colon is fine, "://" is not).
LOCAL_PATH = r"[^:]+(:[^/:][^:]*)*"


def _label_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    if len(prefix) > 253 or len(name) > 63:
        raise ValueError(f"{key!r} is not a label key: the prefix may have 253 characters and "
                         "the name 63")
    return key


LABEL_KEY_MESSAGE = ("keys must be label keys: an optional DNS subdomain and '/', then up to "
                     "63 letters, digits, '-', '_' or '.', starting and ending alphanumeric")
MAX_LABEL_KEY = 253 + 1 + 63  # prefix, '/', name
MAX_LABELS = 64  # keys of a label map: bounds the CEL rule's estimated cost


def _check_label_key(key: str) -> str:
    if not re.fullmatch(LABEL_KEY, key):
        raise ValueError(f"{key!r} is not a label key; {LABEL_KEY_MESSAGE}")
    return _label_key(key)


def is_label_key(key: str) -> bool:
    try:
        _check_label_key(key)
    except ValueError:
        return False
    return True


def cel_string(text: str) -> str:
    """`text` as a CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# The keys of a label map (nodeSelector), checked by the API server: a rule on the map itself
# (a structural schema has no propertyNames). A longer prefix than 253 characters whose name
# is short enough still passes the rule's length bound; the model refuses it.
LABEL_MAP_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        cel=f"self.all(k, size(k) <= {MAX_LABEL_KEY} && k.matches({cel_string(LABEL_KEY)}))",
        message=LABEL_KEY_MESSAGE,
        holds=lambda labels: all(is_label_key(key) for key in labels),
    ),
)
LABEL_MAP_SCHEMA = {"x-kubernetes-validations": cel_validations(LABEL_MAP_RULES)}


DnsLabel = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=DNS_LABEL)]
DnsSubdomain = Annotated[
    str, StringConstraints(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE)]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=317, pattern=LABEL_KEY),
                     AfterValidator(_label_key)]
# As a map key: pydantic's pattern would become `propertyNames`, which a CRD cannot hold;
# a label map's Field carries LABEL_MAP_SCHEMA instead.
LabelKeyOfMap = Annotated[str, AfterValidator(_check_label_key)]
Quantity = Annotated[str, StringConstraints(max_length=64, pattern=QUANTITY)]
ImageRef = Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=r"^\S+$")]


# ---------------------------------------------------------------------------- tolerations


TOLERATION_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        cel="!has(self.operator) || self.operator != 'Exists' || !has(self.value) "
        "|| self.value == ''",
        message="a toleration with operator Exists must not have a value",
        holds=lambda t: t.operator != "Exists" or not t.value,
    ),
    CrossFieldRule(
        cel="(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
        message="a toleration without a key must have operator Exists",
        holds=lambda t: bool(t.key) or t.operator == "Exists",
    ),
    CrossFieldRule(
        cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        message="tolerationSeconds needs effect NoExecute",
        holds=lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
    ),
)


class Toleration(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": cel_validations(TOLERATION_RULES)})

    key: LabelKey | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _rules(self) -> "Toleration":
        problems = broken_rules(TOLERATION_RULES, self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ---------------------------------------------------------------------------- resources


class ResourceList(ApiModel):
    cpu: Quantity | None = Field(None, description="CPU quantity, e.g. '4' or '500m'.")
    memory: Quantity | None = Field(None, description="Memory quantity, e.g. '32Gi'.")
    ephemeral_storage: Quantity | None = Field(None, alias="ephemeral-storage")


class ResourcesSpec(ApiModel):
    requests: ResourceList | None = None
    limits: ResourceList | None = None


# ---------------------------------------------------------------------------- affinity


class NodeSelectorRequirement(ApiModel):
    key: Annotated[str, StringConstraints(min_length=1, max_length=317)]
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[str] | None = None


class NodeSelectorTerm(ApiModel):
    match_expressions: list[NodeSelectorRequirement] | None = None
    match_fields: list[NodeSelectorRequirement] | None = None


class NodeSelector(ApiModel):
    node_selector_terms: list[NodeSelectorTerm] = Field(..., min_length=1)


class PreferredSchedulingTerm(ApiModel):
    weight: int = Field(..., ge=1, le=100)
    preference: NodeSelectorTerm


class NodeAffinity(ApiModel):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = None


class LabelSelectorRequirement(ApiModel):
    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = None


class LabelSelector(ApiModel):
    # Keys checked by the model only: the CEL rule inside lists of affinity terms, which have no
    # bound on their length, would exceed the API server's cost budget.
    match_labels: dict[LabelKeyOfMap, LabelValue] | None = None
    match_expressions: list[LabelSelectorRequirement] | None = None


class PodAffinityTerm(ApiModel):
    label_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    namespaces: list[DnsLabel] | None = None
    topology_key: Annotated[str, StringConstraints(min_length=1, max_length=317)]
    match_label_keys: list[str] | None = None
    mismatch_label_keys: list[str] | None = None


class WeightedPodAffinityTerm(ApiModel):
    weight: int = Field(..., ge=1, le=100)
    pod_affinity_term: PodAffinityTerm


class PodAffinity(ApiModel):
    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = None
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = None


class Affinity(ApiModel):
    """core/v1 Affinity."""

    node_affinity: NodeAffinity | None = None
    pod_affinity: PodAffinity | None = None
    pod_anti_affinity: PodAffinity | None = None


# ---------------------------------------------------------------------------- reference

API_REFERENCE = "https://kubernetes.io/docs/reference/kubernetes-api"
# Models that are standard Kubernetes types (or the part of one a step pod uses), by class
# name: the spec reference shows each as one row linking to the Kubernetes API reference, and
# the CRD's description of such a field links there too (kubectl explain).
STANDARD_TYPES: dict[str, tuple[str, str]] = {
    "Affinity": ("core/v1 Affinity", f"{API_REFERENCE}/workload-resources/pod-v1/#scheduling"),
    "Toleration": ("core/v1 Toleration", f"{API_REFERENCE}/workload-resources/pod-v1/#scheduling"),
    "ResourcesSpec": ("core/v1 ResourceRequirements (requests and limits of cpu, memory, ephemeral-storage)",
                      f"{API_REFERENCE}/workload-resources/pod-v1/#resources"),
    "SecretKeyRef": ("core/v1 SecretKeySelector (name, key)",
                     f"{API_REFERENCE}/common-definitions/secret-key-selector/"),
}

