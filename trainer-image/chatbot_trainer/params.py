"""Reading TrainingParams from config files and flags, with errors a person can act on."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from chatbot_api.spec import TrainingParams

from chatbot_trainer.errors import InvalidConfig

class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader reading `1e-4` as a number, as YAML 1.2 and kubectl do (PyYAML says string)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


# The seed workflow's input names (snake_case) → the spec's fields.
SEED_INPUTS = ("training_data", "model_type", "training_steps", "batch_size", "learning_rate")


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: `batchSize: must be >= 1 (got 0)`."""
    parts = []
    for error in exc.errors():
        where = ".".join(to_camel(p) if isinstance(p, str) else str(p) for p in error["loc"]) or "config"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling)"
        got = error.get("input")
        shown = "" if error["type"] in ("value_error", "missing") or isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{where}: {message}{shown}")
    return "; ".join(parts)


def validate_params(data: dict[str, Any]) -> TrainingParams:
    try:
        return TrainingParams.model_validate(data)
    except ValidationError as exc:
        raise InvalidConfig(f"invalid training settings: {format_validation_error(exc)}") from exc


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or YAML mapping; the seed's `inputs:` block and a whole ChatbotTraining
    manifest (its `spec`) are accepted too. A top-level `name` (or metadata.name) is kept."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidConfig(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = load_yaml(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise InvalidConfig(f"{path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidConfig(f"{path} must hold a mapping of settings, found {type(data).__name__}")
    if isinstance(data.get("inputs"), dict):
        data = {**data["inputs"], **({"name": data["name"]} if "name" in data else {})}
    elif isinstance(data.get("spec"), dict):
        name = (data.get("metadata") or {}).get("name")
        data = {**data["spec"], **({"name": name} if name else {})}
    return data


def split_name(data: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    data = dict(data)
    return data.pop("name", None), data


def cluster_only_fields() -> set[str]:
    """Spec fields the trainer ignores (GPUs, scheduling, storage…), camelCase and snake_case."""
    from chatbot_api.spec import ChatbotTrainingSpec

    names = set(ChatbotTrainingSpec.model_fields) - set(TrainingParams.model_fields)
    return names | {ChatbotTrainingSpec.model_fields[n].alias or n for n in names}


def trainer_params(data: dict[str, Any]) -> TrainingParams:
    """Validate a config for the trainer, ignoring cluster-only spec fields."""
    ignored = cluster_only_fields()
    return validate_params({k: v for k, v in data.items() if k not in ignored})


def set_nested(data: dict[str, Any], dotted: str, raw: str) -> None:
    """Apply `--set lora.rank=8`: values are parsed as YAML scalars/lists."""
    keys = dotted.split(".")
    target = data
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise InvalidConfig(f"--set {dotted}: {key} is not a group of settings")
    target[keys[-1]] = load_yaml(raw)
