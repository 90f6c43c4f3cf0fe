"""The OpenAI request forms the local server takes, read into what llama-cpp-python's `Llama`
needs, and OpenAI-shaped errors for the ones it cannot take.

Pure functions on the decoded JSON body (no llama-cpp-python, no HTTP): the server calls
`chat_request` / `completion_request` and answers an `ApiError` as
`{"error": {"message", "type", "param", "code"}}` with its status.

What clients send and what it becomes here (README, "Serve the model", has the table beside
llama.cpp's server):
- `messages[].content` as a string or as a list of parts: text parts are joined with a newline
  (llama-server does the same); image, audio or file parts are a 400 (a text-only model);
- `n` choices (1 to MAX_CHOICES), generated one after another;
- `response_format`: `text`, `json_object` (optionally with a `schema`) and
  `json_schema` (`{"json_schema": {"schema": …}}`): JSON constrained by a grammar;
- `stream` and `stream_options.include_usage` (a last chunk with `usage` and no choices);
- `stop` (a string or a list), `max_tokens` / `max_completion_tokens` (-1: until the context
  is full, as llama-server; 0 or less than -1: a 400), `seed`, the samplers.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

MAX_CHOICES = 8
ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
# OpenAI's defaults are llama-server's too, except temperature (llama-server: 0.8).
SAMPLERS: dict[str, tuple[type | tuple[type, ...], float | int]] = {
    "temperature": ((int, float), 0.8),
    "top_p": ((int, float), 0.95),
    "top_k": (int, 40),
    "min_p": ((int, float), 0.05),
    "presence_penalty": ((int, float), 0.0),
    "frequency_penalty": ((int, float), 0.0),
    "repeat_penalty": ((int, float), 1.0),
}


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclasses.dataclass
class GenerationRequest:
    """One request: the arguments of `Llama.create_chat_completion` (or `create_completion`)
    and what the server does around them."""

    kwargs: dict[str, Any]
    n: int = 1
    stream: bool = False
    include_usage: bool = False


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise invalid("The request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object")
    return data


def chat_request(data: dict[str, Any]) -> GenerationRequest:
    """A `/v1/chat/completions` body → the request, or ApiError (400)."""
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise invalid("messages: a list of messages is required", "messages")
    if not messages:
        raise invalid("messages: at least one message is required", "messages")
    kwargs = _common(data)
    kwargs["messages"] = [_message(m, i) for i, m in enumerate(messages)]
    response_format = _response_format(data.get("response_format"))
    if response_format is not None:
        kwargs["response_format"] = response_format
    for key in ("tools", "tool_choice"):
        if data.get(key) is not None:
            kwargs[key] = data[key]
    if data.get("logprobs"):
        kwargs["logprobs"] = True
        kwargs["top_logprobs"] = _int(data, "top_logprobs", 0, 0, 20)
    return _generation(data, kwargs)


def completion_request(data: dict[str, Any]) -> GenerationRequest:
    """A `/v1/completions` body → the request, or ApiError (400)."""
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt: one prompt, a string, is required", "prompt")
    kwargs = _common(data)
    kwargs["prompt"] = prompt
    if data.get("echo") is not None:
        kwargs["echo"] = _bool(data, "echo")
    if data.get("logprobs") is not None:
        kwargs["logprobs"] = _int(data, "logprobs", 0, 0, 20)
    return _generation(data, kwargs)


# ----------------------------------------------------------------------------- parts


def _generation(data: dict[str, Any], kwargs: dict[str, Any]) -> GenerationRequest:
    stream = _bool(data, "stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("stream_options: an object is expected", "stream_options")
    include_usage = bool(options and options.get("include_usage")) and stream
    return GenerationRequest(kwargs=kwargs, n=_int(data, "n", 1, 1, MAX_CHOICES), stream=stream,
                             include_usage=include_usage)


def _common(data: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name, (kind, default) in SAMPLERS.items():
        value = data.get(name, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, kind):
            raise invalid(f"{name}: a number is expected", name)
        kwargs[name] = value
    if kwargs["temperature"] < 0:
        raise invalid("temperature: must be at least 0", "temperature")
    key = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = data.get(key)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise invalid(f"{key}: an integer is expected", key)
        if max_tokens == 0 or max_tokens < -1:
            raise invalid(f"{key} must be at least 1 (or -1: until the context is full)", key)
    kwargs["max_tokens"] = None if max_tokens in (None, -1) else max_tokens
    stop = data.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise invalid("stop: a string or a list of strings is expected", "stop")
    kwargs["stop"] = [s for s in stop or [] if s]
    if data.get("seed") is not None:
        kwargs["seed"] = _int(data, "seed", 0, -(2**63), 2**64 - 1)
    return kwargs


def _message(message: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(f"{where}: a message object is expected", where)
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role: {role!r} is not one of {', '.join(sorted(ROLES))}",
                      f"{where}.role")
    result = {k: v for k, v in message.items() if k != "content"}
    if role == "developer":  # OpenAI's newer name for the system message
        result["role"] = "system"
    content = message.get("content")
    if content is None:
        if role != "assistant":
            raise invalid(f"{where}.content: required for a {role} message", f"{where}.content")
        result["content"] = None
    elif isinstance(content, str):
        result["content"] = content
    elif isinstance(content, list):
        result["content"] = _text_of_parts(content, f"{where}.content")
    else:
        raise invalid(f"{where}.content: a string or a list of content parts is expected",
                      f"{where}.content")
    return result


def _text_of_parts(parts: list[Any], where: str) -> str:
    texts = []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_image", "input_audio", "file", "video_url"):
            raise invalid(f"{where}[{i}]: {kind} parts are not supported: the served model reads "
                          "text only", f"{where}[{i}].type")
        else:
            raise invalid(f"{where}[{i}]: a part {{'type': 'text', 'text': …}} is expected",
                          f"{where}[{i}]")
    return "\n".join(texts)


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("schema")
        return {"type": "json_object", **({"schema": _schema(schema)} if schema else {})}
    if kind == "json_schema":
        wrapper = value.get("json_schema")
        if not isinstance(wrapper, dict):
            raise invalid("response_format.json_schema: an object with a schema is expected",
                          "response_format.json_schema")
        return {"type": "json_object", "schema": _schema(wrapper.get("schema") or {})}
    raise invalid("response_format.type: one of text, json_object, json_schema is expected",
                  "response_format.type")


def _schema(schema: Any) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise invalid("response_format: the schema must be a JSON object",
                      "response_format.json_schema.schema")
    return schema or {"type": "object"}  # llama-server: an empty schema is any object


def _int(data: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{key}: an integer is expected", key)
    if not low <= value <= high:
        raise invalid(f"{key} must be between {low} and {high}", key)
    return value


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{key}: true or false is expected", key)
    return value
