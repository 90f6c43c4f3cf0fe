"""Conversation record formats: detection and conversion to chat messages.

Every accepted record becomes a list of messages with the roles ``system``, ``user``,
``assistant`` and ``tool``, plus the tool definitions the conversation may use:

- ``{"role": "system" | "user", "content": str}``;
- ``{"role": "assistant", "content": str}``, with ``"tool_calls": [{"type": "function",
  "function": {"name": str, "arguments": {...}}, "id"?: str}, ...]`` when the assistant calls
  tools (``content`` may then be empty; ``arguments`` is parsed from JSON text when given so);
- ``{"role": "tool", "content": str, "tool_call_id"?: str, "name"?: str}``: a tool's result;
- tools: ``[{"type": "function", "function": {"name": str, "description"?: ..., "parameters"?:
  ...}}, ...]``, as ``apply_chat_template(..., tools=...)`` takes them.

Four record shapes are understood:

``messages``
    OpenAI chat: ``{"messages": [...], "tools"?: [...]}``. ``content`` may be a string or a
    list of parts; text parts (``{"type": "text", "text": ...}``, or ``"value"`` instead of
    ``"text"`` as LLaMA-Factory writes them) are joined with a newline, ``tool_call`` parts
    become tool calls and other parts (images, audio) are ignored. Assistant ``tool_calls``,
    ``tool`` messages and the older ``function_call`` / ``function`` role / ``functions`` forms
    are kept as tool calls, tool results and tools.
``sharegpt``
    ``{"conversations": [{"from": "human", "value": "..."}, ...], "tools"?: ...}`` with ``from``
    one of human/user, gpt/assistant/chatgpt/bing/bard/model, system, and for tool use
    function_call (the value is the call as JSON) and observation (the tool's result).
``alpaca``
    ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` and ``system`` optional).
``prompt_completion``
    ``{"prompt": "...", "completion": "..."}`` (``system`` optional), or TRL's conversational
    form where ``prompt`` and ``completion`` are message lists.

A top-level ``tools`` may be a list or a JSON string of one (LLaMA-Factory); each tool may be
given bare (``{"name", "description", "parameters"}``) or wrapped as OpenAI does.

The converted conversation obeys these rules: at most one system message and only in first
position (several leading system messages are merged), empty turns removed, consecutive user
(or assistant) turns merged, a tool result only after an assistant tool call, trailing user and
tool turns dropped, and at least one assistant turn with text or a tool call. Records that
cannot satisfy them raise :class:`FormatError` with a short reason code. A kept conversation
without any user turn is flagged (:data:`FLAGS`), not dropped.

All functions here are pure and cheap; they run once per record on data sets of 100k+ rows.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "ADJUSTMENTS",
    "FLAGS",
    "FORMATS",
    "REASONS",
    "Conversion",
    "FormatError",
    "convert_record",
    "detect_format",
    "normalise_messages",
    "normalise_text",
    "to_messages",
    "uses_tools",
]

FORMATS: tuple[str, ...] = ("messages", "sharegpt", "alpaca", "prompt_completion")
"""Record formats that can be detected or forced (besides ``auto``)."""

REASONS: dict[str, str] = {
    "empty": "the record has no text at all",
    "unknown_format": "the record matches none of the accepted formats",
    "bad_role": "a turn has a role that is not system, user, assistant or tool",
    "bad_content": "a turn's content is not text",
    "bad_tool_call": "a tool call or tool result is malformed or out of place",
    "bad_tools": "the tool definitions are not a list of function schemas",
    "no_assistant_turn": "the record has no assistant turn with text or a tool call",
}
"""Reason codes raised by :class:`FormatError`, with a one-line explanation each."""

FLAGS: dict[str, str] = {
    "no_user_turn": "kept, but the conversation has no user turn (only system and assistant)",
}
"""Kept conversations that deserve a look, with a one-line explanation each."""

ADJUSTMENTS: dict[str, str] = {
    "trailing_user_turn_dropped": "user turns after the last assistant turn were removed",
    "trailing_tool_result_dropped": "tool results after the last assistant turn were removed",
    "text_part_value_key": "text parts gave their text as 'value'; OpenAI's key is 'text'",
}
"""Changes made to kept conversations, with a one-line explanation each."""

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
    "tool": "tool",
    "function": "tool",  # OpenAI's older name for a tool result
    "observation": "tool",  # ShareGPT (LLaMA-Factory)
    "ipython": "tool",  # Llama 3.1
}
# ShareGPT speakers whose value is an assistant's tool call (as JSON).
_CALL_SPEAKERS = frozenset({"function_call", "tool_call", "tool_calls"})

# C0 control characters except \t and \n, plus DEL; \r is handled before this table is used.
_CONTROL_TABLE = {c: None for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F)}
_SURROGATE = re.compile("[\ud800-\udfff]")

# One turn before normalisation: (role, text, extra). extra is the list of tool calls of an
# assistant turn, the {"tool_call_id", "name"} fields of a tool turn, or None.
Turn = tuple[str, str, Any]


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
    """Result of :func:`convert_record`.

    ``tools`` is None when the record defines none; ``flags`` and ``adjustments`` name the
    :data:`FLAGS` and :data:`ADJUSTMENTS` that apply; ``has_tool_turns`` says whether the
    messages hold tool calls or tool results.
    """

    format: str
    messages: list[dict[str, Any]]
    trailing_user_dropped: int = 0
    tools: list[dict[str, Any]] | None = None
    flags: tuple[str, ...] = ()
    adjustments: tuple[str, ...] = ()
    has_tool_turns: bool = False

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or self.has_tool_turns


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
    notes: list[str] = []
    raw = _CONVERTERS[fmt](record, notes)
    tools = _tools(record)
    normalised = normalise_messages(raw)
    if normalised.trailing_user:
        notes.append("trailing_user_turn_dropped")
    if normalised.trailing_tool:
        notes.append("trailing_tool_result_dropped")
    flags = () if normalised.has_user else ("no_user_turn",)
    adjustments = tuple(dict.fromkeys(notes)) if notes else ()
    return Conversion(
        fmt, normalised.messages, normalised.trailing_user, tools, flags, adjustments,
        normalised.has_tool_turns,
    )


def to_messages(record: Any, fmt: str = "auto") -> list[dict[str, Any]]:
    """Convert one record to message dicts (see :func:`convert_record`)."""
    return convert_record(record, fmt).messages


def uses_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> bool:
    """Whether a converted conversation defines tools, calls them or holds tool results."""
    return bool(tools) or any(m.get("role") == "tool" or "tool_calls" in m for m in messages)


class Normalised(NamedTuple):
    """Result of :func:`normalise_messages`."""

    messages: list[dict[str, Any]]
    trailing_user: int  # trailing user turns dropped
    trailing_tool: int  # trailing tool results dropped
    has_user: bool
    has_tool_turns: bool  # tool calls or tool results


def normalise_messages(raw: list[Turn]) -> Normalised:
    """Apply the conversation rules to ``(role, text, extra)`` turns with canonical roles."""
    turns: list[list[Any]] = []  # [role, content, extra], merged as we go
    any_text = False
    for position, (role, text, extra) in enumerate(raw):
        text = normalise_text(text)
        if role == "tool":
            if not turns or not (turns[-1][0] == "tool" or (turns[-1][0] == "assistant" and turns[-1][2])):
                raise FormatError(
                    "bad_tool_call",
                    f"tool result at turn {position + 1} does not follow an assistant tool call",
                )
            any_text = True
            turns.append([role, text, extra])
            continue
        if not text and not extra:
            continue
        any_text = True
        if role == "system" and turns and turns[-1][0] != "system":
            raise FormatError(
                "bad_role",
                f"system message at turn {position + 1}; only one leading system message "
                "is supported",
            )
        if turns and turns[-1][0] == role:
            last = turns[-1]
            if text:
                last[1] = f"{last[1]}\n\n{text}" if last[1] else text
            if extra:
                last[2] = (last[2] or []) + extra
        else:
            turns.append([role, text, extra])
    if not any_text:
        raise FormatError("empty", "all turns are empty")
    trailing_user = trailing_tool = 0
    while turns and turns[-1][0] in ("user", "tool"):
        if turns.pop()[0] == "user":
            trailing_user += 1
        else:
            trailing_tool += 1
    if not any(role == "assistant" for role, _, _ in turns):
        raise FormatError("no_assistant_turn", "no assistant turn with text or a tool call")
    messages: list[dict[str, Any]] = []
    has_user = has_tool_turns = False
    for role, content, extra in turns:
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "user":
            has_user = True
        elif role == "tool":
            has_tool_turns = True
        if extra:
            has_tool_turns = True
            if role == "assistant":
                message["tool_calls"] = extra
            else:
                message.update(extra)
        messages.append(message)
    return Normalised(messages, trailing_user, trailing_tool, has_user, has_tool_turns)


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


def _content(value: Any, where: str, notes: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """Text and tool calls of a content value: a string, null, or a list of content parts."""
    if isinstance(value, str):
        return value, []
    if value is None:
        return "", []
    if isinstance(value, list):
        parts: list[str] = []
        calls: list[dict[str, Any]] = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                kind = part.get("type", "text")
                if kind == "text":
                    parts.append(_part_text(part, where, notes))
                elif kind in ("tool_call", "function_call"):  # LLaMA-Factory's messages format
                    calls += _calls_from_json(part.get("value", part.get("text")), where)
                # image_url, input_audio and other non-text parts carry no text: ignored
            else:
                raise FormatError(
                    "bad_content", f"{where}: content part is {_json_type(part)}"
                )
        return "\n".join(parts), calls
    raise FormatError(
        "bad_content", f"{where}: content is {_json_type(value)}, expected text"
    )


def _part_text(part: dict[str, Any], where: str, notes: list[str]) -> str:
    text = part.get("text")
    if isinstance(text, str):
        return text
    if text is None and isinstance(part.get("value"), str):
        notes.append("text_part_value_key")
        return part["value"]
    keys = ", ".join(sorted(map(str, part)))
    raise FormatError(
        "bad_content",
        f"{where}: a text part has {_json_type(text)} as 'text' (keys: {keys}); write text parts "
        'as {"type": "text", "text": "..."}',
    )


def _text(value: Any, where: str, notes: list[str]) -> str:
    """Text of a content value where tool calls cannot appear."""
    text, calls = _content(value, where, notes)
    if calls:
        raise FormatError("bad_tool_call", f"{where}: only assistant turns can call tools")
    return text


def _tool_result_text(value: Any, where: str, notes: list[str]) -> str:
    """A tool's result: text, content parts, or structured JSON (kept as JSON text)."""
    if isinstance(value, (dict, int, float, bool)) or (
        isinstance(value, list) and value and not all(isinstance(p, (dict, str)) for p in value)
    ):
        return json.dumps(value, ensure_ascii=False)
    return _text(value, where, notes)


def _role(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise FormatError("bad_role", f"{where}: role is {_json_type(value)}")
    role = _ROLE_MAP.get(value.strip().lower())
    if role is not None:
        return role
    raise FormatError(
        "bad_role",
        f"{where}: unknown role {value!r}; expected system, user, assistant or tool",
    )


def _parse_json_text(value: Any, where: str, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        raise FormatError("bad_tool_call", f"{where}: {what} is not valid JSON") from None


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """One tool call in the form chat templates read: {"type", "function": {"name", "arguments"}}."""
    if not isinstance(call, dict):
        raise FormatError("bad_tool_call", f"{where}: a tool call is {_json_type(call)}")
    function = call.get("function") if isinstance(call.get("function"), dict) else call
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise FormatError("bad_tool_call", f"{where}: a tool call has no function name")
    arguments = function.get("arguments", function.get("parameters"))
    arguments = _parse_json_text(arguments, where, f"the arguments of the call to {name!r}")
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": name.strip(), "arguments": {} if arguments is None else arguments},
    }
    if isinstance(call.get("id"), str) and call["id"]:
        out["id"] = call["id"]
    return out


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    calls = value if isinstance(value, list) else [value]
    return [_tool_call(call, where) for call in calls]


def _calls_from_json(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls given as JSON text (ShareGPT function_call turns, LLaMA-Factory parts)."""
    return _tool_calls(_parse_json_text(value, where, "the tool call"), where)


def _tool_fields(message: dict[str, Any]) -> dict[str, str] | None:
    fields = {
        key: message[key]
        for key in ("tool_call_id", "name")
        if isinstance(message.get(key), str) and message[key]
    }
    return fields or None


def _tools(record: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The record's tool definitions (``tools``, or OpenAI's older ``functions``), or None."""
    value = record.get("tools")
    if value is None:
        value = record.get("functions")
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise FormatError("bad_tools", "'tools' is text but not valid JSON") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise FormatError("bad_tools", f"'tools' is {_json_type(value)}, expected a list")
    tools = []
    for i, tool in enumerate(value, 1):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise FormatError("bad_tools", f"tools[{i}] is not a function schema with a name")
        tools.append({"type": "function", "function": function})
    return tools or None


def _message_list(value: Any, field: str, notes: list[str]) -> list[Turn]:
    """Convert an OpenAI-style list of messages."""
    if not isinstance(value, list):
        raise FormatError(
            "unknown_format", f"'{field}' is {_json_type(value)}, expected a list of messages"
        )
    out: list[Turn] = []
    role_map = _ROLE_MAP
    for i, msg in enumerate(value, 1):
        # fast path: exactly {"role": "<system, user or assistant>", "content": "<text>"}
        if type(msg) is dict and len(msg) == 2:
            role = msg.get("role")
            content = msg.get("content")
            if type(role) is str and type(content) is str:
                mapped = role_map.get(role)
                if mapped is not None and mapped != "tool":
                    out.append((mapped, content, None))
                    continue
        out.append(_message(msg, f"{field}[{i}]", notes))
    return out


def _message(msg: Any, where: str, notes: list[str]) -> Turn:
    if not isinstance(msg, dict):
        raise FormatError("bad_content", f"{where} is {_json_type(msg)}, expected an object")
    if "role" not in msg and "from" in msg:  # ShareGPT-style keys inside a messages list
        speaker, content = msg.get("from"), msg.get("value")
    else:
        speaker, content = msg.get("role"), msg.get("content")
    if isinstance(speaker, str) and speaker.strip().lower() in _CALL_SPEAKERS:
        return ("assistant", "", _calls_from_json(content, where))
    role = _role(speaker, where)
    calls = msg.get("tool_calls") or msg.get("function_call")
    if role == "assistant":
        text, part_calls = _content(content, where, notes)
        if calls:
            part_calls = _tool_calls(calls, where) + part_calls
        return (role, text, part_calls or None)
    if calls:
        raise FormatError("bad_tool_call", f"{where}: only assistant turns can call tools")
    if role == "tool":
        return (role, _tool_result_text(content, where, notes), _tool_fields(msg))
    return (role, _text(content, where, notes), None)


def _system(record: dict[str, Any], notes: list[str]) -> list[Turn]:
    system = record.get("system")
    if system is None:
        return []
    return [("system", _text(system, "system", notes), None)]


def _from_messages(record: dict[str, Any], notes: list[str]) -> list[Turn]:
    if "messages" not in record:
        raise FormatError("unknown_format", "not in messages format: no 'messages' list")
    return _system(record, notes) + _message_list(record["messages"], "messages", notes)


def _from_sharegpt(record: dict[str, Any], notes: list[str]) -> list[Turn]:
    if "conversations" not in record:
        raise FormatError("unknown_format", "not in sharegpt format: no 'conversations' list")
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise FormatError(
            "unknown_format", f"'conversations' is {_json_type(turns)}, expected a list"
        )
    out = _system(record, notes)
    for i, turn in enumerate(turns, 1):
        out.append(_message(turn, f"conversations[{i}]", notes))
    return out


def _from_alpaca(record: dict[str, Any], notes: list[str]) -> list[Turn]:
    if "instruction" not in record or "output" not in record:
        raise FormatError(
            "unknown_format", "not in alpaca format: needs 'instruction' and 'output'"
        )
    instruction = normalise_text(_text(record["instruction"], "instruction", notes))
    extra = normalise_text(_text(record.get("input"), "input", notes))
    user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    answer = _text(record["output"], "output", notes)
    return _system(record, notes) + [("user", user, None), ("assistant", answer, None)]


def _is_message_list(value: Any) -> bool:
    """True for TRL's conversational prompt/completion (a list of role/content dicts)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in value)
    )


def _from_prompt_completion(record: dict[str, Any], notes: list[str]) -> list[Turn]:
    if "prompt" not in record or "completion" not in record:
        raise FormatError(
            "unknown_format", "not in prompt_completion format: needs 'prompt' and 'completion'"
        )
    prompt, completion = record["prompt"], record["completion"]
    out = _system(record, notes)
    if _is_message_list(prompt):
        out += _message_list(prompt, "prompt", notes)
    else:
        out.append(("user", _text(prompt, "prompt", notes), None))
    if _is_message_list(completion):
        out += _message_list(completion, "completion", notes)
    else:
        out.append(("assistant", _text(completion, "completion", notes), None))
    return out


_CONVERTERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
}
