"""Tool calls in a model's answer, returned as OpenAI `tool_calls` (as llama-server does).

Models with Qwen2.5's tool format (Qwen2.5, and ChatML models trained with `chatTemplate:
chatml-tools`) answer a tool request with `<tool_call>{"name": …, "arguments": {…}}</tool_call>`
blocks. llama-cpp-python hands that back as text; llama-server parses it into `tool_calls`
with `finish_reason: "tool_calls"`. These pure functions do the same for the local server, for
whole answers and for streams (the text is held back while it may still be a call). A block
that is not a JSON object with a string `name` leaves the answer as text. Other templates'
call formats (Llama 3.1's bare JSON) stay text.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


def parse(text: str) -> tuple[str, list[dict[str, Any]]] | None:
    """(the text before the first call, the calls in OpenAI form), or None when `text` holds no
    well-formed call or anything but whitespace after its calls."""
    start = text.find(OPEN)
    if start < 0:
        return None
    calls, end = [], start
    for match in BLOCK.finditer(text, start):
        if text[end:match.start()].strip():
            return None
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {
            "name": call["name"],
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)}})
        end = match.end()
    if not calls or text[end:].strip():
        return None
    return text[:start].strip(), calls


def wanted(kwargs: dict[str, Any]) -> bool:
    """Whether a chat request offers tools the model may call."""
    return bool(kwargs.get("tools")) and kwargs.get("tool_choice") != "none"


def in_message(choice: dict[str, Any]) -> dict[str, Any]:
    """A whole answer's choice, its calls moved from the text into `tool_calls`."""
    message = choice.get("message") or {}
    if message.get("tool_calls") or not isinstance(message.get("content"), str):
        return choice
    parsed = parse(message["content"])
    if parsed is None:
        return choice
    content, calls = parsed
    return {**choice, "message": {**message, "content": content, "tool_calls": calls},
            "finish_reason": "tool_calls"}


class StreamFilter:
    """A stream's chunks with the calls of its text as `tool_calls` deltas: content is held back
    while the text so far may begin a call, and passed on unchanged once it cannot."""

    def __init__(self) -> None:
        self.text = ""
        self.held: list[dict[str, Any]] = []
        self.holding = True

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        choices = chunk.get("choices") or []
        if not self.holding or not choices:
            return [chunk]
        choice = choices[0]
        delta = choice.get("delta") or {}
        if delta.get("tool_calls"):
            self.holding = False
            return [*self._release(), chunk]
        self.text += delta.get("content") or ""
        if choice.get("finish_reason"):
            return self._finish(chunk)
        stripped = self.text.lstrip()
        if stripped.startswith(OPEN) or OPEN.startswith(stripped):
            self.held.append(chunk)
            return []
        self.holding = False
        return [*self._release(), chunk]

    def _release(self) -> list[dict[str, Any]]:
        held, self.held = self.held, []
        return held

    def _finish(self, last: dict[str, Any]) -> list[dict[str, Any]]:
        self.holding = False
        parsed = parse(self.text)
        if parsed is None:
            return [*self._release(), last]
        content, calls = parsed
        first = self.held[0] if self.held else last
        role = ((first.get("choices") or [{}])[0].get("delta") or {}).get("role")
        self.held = []
        deltas: list[dict[str, Any]] = []
        if role:
            deltas.append({"role": role})
        if content:
            deltas.append({"content": content})
        deltas.append({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
        return [*(_with(last, delta, None) for delta in deltas), _with(last, {}, "tool_calls")]


def _with(chunk: dict[str, Any], delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    choice = {**(chunk.get("choices") or [{}])[0], "delta": delta, "finish_reason": finish}
    return {**chunk, "choices": [choice]}
