"""What every API model shares: camelCase on the wire, strict types, and rules with a CEL twin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Base for API objects: camelCase on the wire, snake_case in Python, unknown keys rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
        strict=True,  # as the API server: "100" is not an integer
    )

    def to_api(self) -> dict[str, Any]:
        """The camelCase dict as stored in Kubernetes (unset optional fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


@dataclass(frozen=True)
class CrossFieldRule:
    """One rule over an object: `cel` for the CRD, `holds` for Python, same intent."""

    cel: str
    message: str
    holds: Callable[[Any], bool]


def broken_rules(rules: tuple[CrossFieldRule, ...], value: Any) -> list[str]:
    """The messages of the rules `value` breaks."""
    return [rule.message for rule in rules if not rule.holds(value)]


def cel_validations(rules: tuple[CrossFieldRule, ...]) -> list[dict[str, str]]:
    """The rules as the CRD's `x-kubernetes-validations`."""
    return [{"rule": rule.cel, "message": rule.message} for rule in rules]
