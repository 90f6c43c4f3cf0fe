"""Conversation record formats: detection and conversion to chat messages.

Every accepted record becomes a list of ``{"role": ..., "content": ...}`` dicts whose roles
are only ``system``, ``user`` and ``assistant``. Four record shapes are understood:

``messages``
    OpenAI chat: ``{"messages": [{"role": "user", "content": "..."}, ...]}``. ``content`` may
    be a string or a list of parts; ``{"type": "text", "text": ...}`` parts are joined with a
    newline and other parts (images, audio) are ignored.
``sharegpt``
    ``{"conversations": [{"from": "human", "value": "..."}, ...]}`` with ``from`` one of
    human/user, gpt/assistant/chatgpt/bing/bard/model, system.
``alpaca``
    ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` and ``system`` optional).
``prompt_completion``
    ``{"prompt": "...", "completion": "..."}`` (``system`` optional), or TRL's conversational
    form where ``prompt`` and ``completion`` are message lists.

The converted conversation obeys these rules: at most one system message and only in first
position (several leading system messages are merged), empty turns removed, consecutive turns
of the same role merged, trailing user turns dropped, and at least one non-empty assistant turn.
Records that cannot satisfy them raise :class:`FormatError` with a short reason code.

All functions here are pure and cheap; they run once per record on data sets of 100k+ rows.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FORMATS",
    "REASONS",
    "Conversion",
    "FormatError",
    "convert_record",
    "detect_format",
    "normalise_messages",
    "normalise_text",
    "to_messages",
]

FORMATS: tuple[str, ...] = ("messages", "sharegpt", "alpaca", "prompt_completion")
"""Record formats that can be detected or forced (besides ``auto``)."""

REASONS: dict[str, str] = {
    "empty": "the record has no text at all",
    "unknown_format": "the record matches none of the accepted formats",
    "bad_role": "a turn has a role that is not system, user or assistant",
    "bad_content": "a turn's content is not text",
    "no_assistant_turn": "the record has no non-empty assistant turn",
}
"""Reason codes raised by :class:`FormatError`, with a one-line explanation each."""

_ROLE_MAP: dict[str, str] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
_TOOL_ROLES = frozenset(
    {"tool", "function", "function_call", "observation", "tool_call", "ipython"}
)

# C0 control characters except \t and \n, plus DEL; \r is handled before this table is used.
_CONTROL_TABLE = {c: None for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F)}
_SURROGATE = re.compile("[\ud800-\udfff]")


class FormatError(ValueError):
    """A record that cannot be converted to a conversation.

    ``reason`` is a short snake_case code (see :data:`REASONS`), ``message`` a one-line
    explanation for people.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # keep the two-argument constructor picklable
        return (type(self), (self.reason, self.message))


@dataclass(frozen=True)
class Conversion:
    """Result of :func:`convert_record`."""

    format: str
    messages: list[dict[str, str]]
    trailing_user_dropped: int = 0


def normalise_text(s: str) -> str:
    """Normalise one message's text.

    Unicode NFC; ``\\r\\n`` and ``\\r`` become ``\\n``; C0 control characters other than
    ``\\n`` and ``\\t`` (and DEL) are removed; trailing whitespace is stripped from every line;
    blank lines at the start and end are removed (indentation of the first line is kept).
    """
    if not s:
        return ""
    if "\r" in s:
        s = s.replace("\r\n", "\n").replace("\r", "\n")
    if not s.isprintable():  # fast check: only then can control characters be present
        s = s.translate(_CONTROL_TABLE)
        if not s.isascii() and _SURROGATE.search(s):  # lone "\ud800" escapes from JSON
            s = _SURROGATE.sub("\ufffd", s)
    if not s.isascii() and not unicodedata.is_normalized("NFC", s):
        s = unicodedata.normalize("NFC", s)
    if "\n" in s:
        lines = [line.rstrip() for line in s.split("\n")]
        start, end = 0, len(lines)
        while start < end and not lines[start]:
            start += 1
        while end > start and not lines[end - 1]:
            end -= 1
        return "\n".join(lines[start:end])
    return s.rstrip()


def detect_format(record: Any) -> str:
    """Return the format name of ``record`` or raise :class:`FormatError` (``unknown_format``)."""
    if not isinstance(record, dict):
        raise FormatError(
            "unknown_format", f"expected a JSON object, got {_json_type(record)}"
        )
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if not record:
        raise FormatError("empty", "empty object")
    keys = ", ".join(sorted(map(str, record))[:8])
    raise FormatError(
        "unknown_format",
        f"no known format matches keys [{keys}]; expected 'messages', 'conversations', "
        "'instruction'+'output' or 'prompt'+'completion'",
    )


def convert_record(record: Any, fmt: str = "auto") -> Conversion:
    """Detect (or check the forced ``fmt``) and convert one record to a conversation."""
    if fmt == "auto":
        fmt = detect_format(record)
    elif fmt not in _CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    elif not isinstance(record, dict):
        raise FormatError("unknown_format", f"expected a JSON object, got {_json_type(record)}")
    elif not record:
        raise FormatError("empty", "empty object")
    raw = _CONVERTERS[fmt](record)
    messages, dropped = normalise_messages(raw)
    return Conversion(fmt, messages, dropped)


def to_messages(record: Any, fmt: str = "auto") -> list[dict[str, str]]:
    """Convert one record to ``{"role", "content"}`` dicts (see :func:`convert_record`)."""
    return convert_record(record, fmt).messages


def normalise_messages(raw: list[tuple[str, str]]) -> tuple[list[dict[str, str]], int]:
    """Apply the conversation rules to ``(role, text)`` pairs with canonical roles.

    Returns the messages and the number of trailing user turns that were dropped.
    """
    turns: list[list[str]] = []  # [role, content] pairs, merged as we go
    any_text = False
    for position, (role, text) in enumerate(raw):
        text = normalise_text(text)
        if not text:
            continue
        any_text = True
        if role == "system" and turns and turns[-1][0] != "system":
            raise FormatError(
                "bad_role",
                f"system message at turn {position + 1}; only one leading system message "
                "is supported",
            )
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n\n" + text
        else:
            turns.append([role, text])
    if not any_text:
        raise FormatError("empty", "all turns are empty")
    dropped = 0
    while turns and turns[-1][0] == "user":
        turns.pop()
        dropped += 1
    if not any(role == "assistant" for role, _ in turns):
        raise FormatError("no_assistant_turn", "no non-empty assistant turn")
    return [{"role": role, "content": content} for role, content in turns], dropped


# --------------------------------------------------------------------------- converters


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _text(value: Any, where: str) -> str:
    """Text of a content value: a string, null, or a list of content parts."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        parts: list[str] = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                if part.get("type", "text") == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise FormatError(
                            "bad_content", f"{where}: text part has {_json_type(text)} as text"
                        )
                    parts.append(text)
                # image_url, input_audio and other non-text parts carry no text: ignored
            else:
                raise FormatError(
                    "bad_content", f"{where}: content part is {_json_type(part)}"
                )
        return "\n".join(parts)
    raise FormatError(
        "bad_content", f"{where}: content is {_json_type(value)}, expected text"
    )


def _role(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise FormatError("bad_role", f"{where}: role is {_json_type(value)}")
    key = value.strip().lower()
    role = _ROLE_MAP.get(key)
    if role is not None:
        return role
    if key in _TOOL_ROLES:
        raise FormatError(
            "bad_role", f"{where}: tool/function turns ({value!r}) are not supported yet"
        )
    raise FormatError(
        "bad_role", f"{where}: unknown role {value!r}; expected system, user or assistant"
    )


def _message_list(value: Any, field: str) -> list[tuple[str, str]]:
    """Convert an OpenAI-style list of ``{"role", "content"}`` messages."""
    if not isinstance(value, list):
        raise FormatError(
            "unknown_format", f"'{field}' is {_json_type(value)}, expected a list of messages"
        )
    out: list[tuple[str, str]] = []
    role_map = _ROLE_MAP
    for i, msg in enumerate(value, 1):
        # fast path: exactly {"role": "<known role>", "content": "<text>"}
        if type(msg) is dict and len(msg) == 2:
            role = msg.get("role")
            content = msg.get("content")
            if type(role) is str and type(content) is str:
                mapped = role_map.get(role)
                if mapped is not None:
                    out.append((mapped, content))
                    continue
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise FormatError("bad_content", f"{where} is {_json_type(msg)}, expected an object")
        if "role" not in msg and "from" in msg:  # ShareGPT-style keys inside a messages list
            role = _role(msg.get("from"), where)
            content = msg.get("value")
        else:
            role = _role(msg.get("role"), where)
            content = msg.get("content")
        if msg.get("tool_calls") or msg.get("function_call"):
            raise FormatError("bad_role", f"{where}: tool calls are not supported yet")
        out.append((role, _text(content, where)))
    return out


def _system(record: dict[str, Any]) -> list[tuple[str, str]]:
    system = record.get("system")
    if system is None:
        return []
    return [("system", _text(system, "system"))]


def _from_messages(record: dict[str, Any]) -> list[tuple[str, str]]:
    if "messages" not in record:
        raise FormatError("unknown_format", "not in messages format: no 'messages' list")
    return _system(record) + _message_list(record["messages"], "messages")


def _from_sharegpt(record: dict[str, Any]) -> list[tuple[str, str]]:
    if "conversations" not in record:
        raise FormatError("unknown_format", "not in sharegpt format: no 'conversations' list")
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise FormatError(
            "unknown_format", f"'conversations' is {_json_type(turns)}, expected a list"
        )
    out = _system(record)
    for i, turn in enumerate(turns, 1):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise FormatError("bad_content", f"{where} is {_json_type(turn)}, expected an object")
        if "from" in turn or "value" in turn:
            out.append((_role(turn.get("from"), where), _text(turn.get("value"), where)))
        else:
            out.append((_role(turn.get("role"), where), _text(turn.get("content"), where)))
    return out


def _from_alpaca(record: dict[str, Any]) -> list[tuple[str, str]]:
    if "instruction" not in record or "output" not in record:
        raise FormatError(
            "unknown_format", "not in alpaca format: needs 'instruction' and 'output'"
        )
    instruction = normalise_text(_text(record["instruction"], "instruction"))
    extra = normalise_text(_text(record.get("input"), "input"))
    user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    return _system(record) + [("user", user), ("assistant", _text(record["output"], "output"))]


def _is_message_list(value: Any) -> bool:
    """True for TRL's conversational prompt/completion (a list of role/content dicts)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in value)
    )


def _from_prompt_completion(record: dict[str, Any]) -> list[tuple[str, str]]:
    if "prompt" not in record or "completion" not in record:
        raise FormatError(
            "unknown_format", "not in prompt_completion format: needs 'prompt' and 'completion'"
        )
    prompt, completion = record["prompt"], record["completion"]
    out = _system(record)
    if _is_message_list(prompt):
        out += _message_list(prompt, "prompt")
    else:
        out.append(("user", _text(prompt, "prompt")))
    if _is_message_list(completion):
        out += _message_list(completion, "completion")
    else:
        out.append(("assistant", _text(completion, "completion")))
    return out


_CONVERTERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
}
