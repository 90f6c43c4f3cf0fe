"""Conversations → token ids and labels: the loss is computed on the assistant's tokens only.

Each conversation is rendered with the tokenizer's chat template (with its tool definitions,
``apply_chat_template(..., tools=...)``, when it has any) and tokenized once. Labels are the
token ids on the assistant's turns, text and tool calls alike (including the token that ends
the turn, which is what teaches the model to stop), and -100 everywhere else: system, user and
tool-result turns, and the tool definitions. The assistant's characters come from:

- the template's ``{% generation %}`` markers, when it has them (our ChatML template does);
- otherwise, for any template: the conversation rendered up to each assistant message with
  ``add_generation_prompt=True`` (where the assistant's text starts) and up to and including
  that message (where it ends). Trailing whitespace after the turn is not trained.

Character spans become token labels through the fast tokenizer's offsets (a token is labelled
when it overlaps a span), so the whole data set is tokenized in a few batched calls. Slow
tokenizers (no offsets) tokenize each span on its own instead.

Conversations longer than ``max_seq_length`` tokens are dropped, not truncated (a truncated
conversation teaches the model to stop mid-answer), and counted. Conversations with tools are
dropped and counted (``tools_unsupported``) when the chat template cannot express tool calls
(see data/chat_templates.py); the configure step reports that before training.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import numpy as np

from chatbot_trainer.data.chat_templates import (
    CHATML_TEMPLATE,
    IM_END,
    IM_START,
    TEMPLATE_VARIABLES,
    tool_support_gap,
)
from chatbot_trainer.data.formats import uses_tools

IGNORE_INDEX = -100
TOKENIZE_CHUNK = 2048  # conversations per batched tokenizer call
MAX_REPORTED_LINES = 20  # source line numbers listed per drop reason

DROP_REASONS = ("too_many_tokens", "no_assistant_tokens", "template_error", "tools_unsupported")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Span = tuple[int, int]


def has_generation_markers(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks assistant text with {% generation %}."""
    template = tokenizer.chat_template
    return isinstance(template, str) and bool(_GENERATION_TAG.search(template))


# ---------------------------------------------------------------------------- rendering


def _template_kwargs(tokenizer) -> dict[str, Any]:
    # apply_chat_template passes the special tokens (bos_token, eos_token, …) to the template.
    return {**tokenizer.special_tokens_map, **TEMPLATE_VARIABLES}


def _render_marked(tokenizer, messages: list[dict[str, Any]], tools=None) -> tuple[str, list[Span]]:
    """Render with {% generation %} markers: the text and the assistant's character spans."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, indices = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=True,
        add_generation_prompt=False,
        **_template_kwargs(tokenizer),
    )
    return rendered[0], [(int(a), int(b)) for a, b in indices[0] if b > a]


def _render_chatml(messages: list[dict[str, str]], tools=None) -> tuple[str, list[Span]]:
    """CHATML_TEMPLATE rendered directly (same text and spans as the Jinja template, ~20x faster)."""
    parts: list[str] = []
    spans: list[Span] = []
    length = 0
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            head = f"{IM_START}assistant\n"
            body = content + IM_END
            start = length + len(head)
            spans.append((start, start + len(body)))
            piece = head + body + "\n"
        else:
            piece = f"{IM_START}{role}\n{content}{IM_END}\n"
        parts.append(piece)
        length += len(piece)
    return "".join(parts), spans


def _renderer(tokenizer):
    """The function rendering one conversation (messages, tools) to (text, assistant spans).

    The direct ChatML renderer knows no tools; CHATML_TEMPLATE cannot express them either, so
    tool conversations never reach it (tokenize_dataset drops them first).
    """
    if tokenizer.chat_template == CHATML_TEMPLATE:
        return _render_chatml
    if has_generation_markers(tokenizer):
        return lambda messages, tools=None: _render_marked(tokenizer, messages, tools)
    return lambda messages, tools=None: _render_by_prefixes(tokenizer, messages, tools)


def _render(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool, tools=None) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **TEMPLATE_VARIABLES
    )


def _render_by_prefixes(tokenizer, messages: list[dict[str, Any]], tools=None) -> tuple[str, list[Span]]:
    """Any template: find each assistant turn as the text between two renders of the prefix.

    Raises ValueError when the template does not render conversations as growing prefixes
    (a template that rewrites earlier turns cannot be labelled this way).
    """
    text = _render(tokenizer, messages, False, tools)
    spans: list[Span] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start_text = _render(tokenizer, messages[:i], True, tools) if i else ""
        end_text = _render(tokenizer, messages[: i + 1], False, tools)
        if not end_text.startswith(start_text) or not text.startswith(end_text):
            raise ValueError("the chat template does not render conversations as growing prefixes")
        start, end = len(start_text), len(end_text)
        while end > start and end_text[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))
    return text, spans


def render_conversation(tokenizer, messages: list[dict[str, Any]], tools=None) -> tuple[str, list[Span]]:
    """The conversation as text and the character spans of the assistant's turns."""
    if tools:
        return _renderer(tokenizer)(messages, tools)
    return _renderer(tokenizer)(messages)


# ---------------------------------------------------------------------------- labelling


def _labels_from_offsets(ids: np.ndarray, offsets: Sequence[Span], spans: list[Span]) -> np.ndarray:
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    if not spans or len(ids) == 0:
        return labels
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = offs[:, 0], offs[:, 1]
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        mask |= (starts < b) & (ends > a)
    labels[mask] = ids[mask]
    labels[0] = IGNORE_INDEX  # the first token is never predicted
    return labels


def _label_encoding(encoding, spans: list[Span]) -> tuple[np.ndarray, np.ndarray]:
    """Ids and labels of one fast-tokenizer encoding: the tokens overlapping the spans.

    The first and last token of each span come from ``char_to_token`` (no per-token work);
    the offsets are used only when a span edge falls outside every token.
    """
    ids = np.asarray(encoding.ids, dtype=np.int32)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    for a, b in spans:
        first, last = encoding.char_to_token(a), encoding.char_to_token(b - 1)
        if first is None or last is None:
            return ids, _labels_from_offsets(ids, encoding.offsets, spans)
        labels[first : last + 1] = ids[first : last + 1]
    if len(labels):
        labels[0] = IGNORE_INDEX
    return ids, labels


def _encode_batch(tokenizer, texts: list[str]) -> list:
    """Fast-tokenizer encodings (ids, offsets) of texts, without special tokens added."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    plain = (
        backend is not None
        and backend.truncation is None
        and backend.padding is None
        and not getattr(tokenizer, "split_special_tokens", False)
        and not backend.encode_special_tokens
    )
    if plain:  # what tokenizer(texts) runs, minus building Python lists of every output
        return backend.encode_batch(texts, add_special_tokens=False)
    encoded = tokenizer(
        texts,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    return encoded.encodings


def _tokenize_pieces(tokenizer, text: str, spans: list[Span]) -> tuple[np.ndarray, np.ndarray]:
    """Slow tokenizers (no offsets): tokenize the text between span boundaries piece by piece."""
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for a, b in [*spans, (len(text), len(text))]:
        for piece, trained in ((text[cursor:a], False), (text[a:b], True)):
            if piece:
                piece_ids = tokenizer.encode(piece, add_special_tokens=False)
                ids.extend(piece_ids)
                labels.extend(piece_ids if trained else [IGNORE_INDEX] * len(piece_ids))
        cursor = b
    ids_arr = np.asarray(ids, dtype=np.int32)
    labels_arr = np.asarray(labels, dtype=np.int32)
    if len(labels_arr):
        labels_arr[0] = IGNORE_INDEX
    return ids_arr, labels_arr


def _finish(ids: np.ndarray, labels: np.ndarray, max_seq_length: int) -> tuple[dict | None, str]:
    if len(ids) > max_seq_length:
        return None, "too_many_tokens"
    if not (labels != IGNORE_INDEX).any():
        return None, "no_assistant_tokens"
    return {"input_ids": ids, "labels": labels}, "kept"


def tokenize_conversation(
    tokenizer, messages: list[dict[str, Any]], max_seq_length: int, tools: list[dict[str, Any]] | None = None
) -> dict | None:
    """One conversation → {"input_ids", "labels"} (int32 arrays), or None when it is dropped.

    Dropped: longer than max_seq_length tokens, no assistant tokens, the template refused it or
    cannot express its tools.
    """
    conversation = {"messages": messages, **({"tools": tools} if tools else {})}
    examples, _ = tokenize_dataset(tokenizer, [conversation], max_seq_length)
    return examples[0] if examples else None


def _parts_of(conversation: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, int | None]:
    """(messages, tools, source line) of ``{"messages", "tools"?, "line"?}`` or a message list."""
    if isinstance(conversation, dict):
        return conversation["messages"], conversation.get("tools"), conversation.get("line")
    return list(conversation), None, None


def tokenize_dataset(
    tokenizer, conversations: Iterable[Any], max_seq_length: int
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """Tokenize conversations (``{"messages": [...], "tools"?: [...]}`` or message lists).

    Returns the kept examples, in input order, and counts: ``total``, ``kept``, one key per
    drop reason (``too_many_tokens``, ``no_assistant_tokens``, ``template_error``,
    ``tools_unsupported``), ``tokens`` and ``label_tokens`` (over the kept examples), and, when
    the conversations carry the ``line`` prepare gave them and some were dropped,
    ``dropped_lines``: the first source lines per drop reason.
    """
    counts: dict[str, Any] = {
        "total": 0, "kept": 0, **{reason: 0 for reason in DROP_REASONS}, "tokens": 0, "label_tokens": 0,
    }
    dropped_lines: dict[str, list[int]] = {}
    examples: list[dict[str, np.ndarray]] = []
    render = _renderer(tokenizer)
    fast = bool(getattr(tokenizer, "is_fast", False))
    tools_gap: list[str | None] = []  # checked once, at the first conversation with tools

    def drop(reason: str, line: int | None) -> None:
        counts[reason] += 1
        if line is not None and counts[reason] <= MAX_REPORTED_LINES:
            dropped_lines.setdefault(reason, []).append(line)

    def flush(texts: list[str], spans: list[list[Span]], lines: list[int | None]) -> None:
        if not texts:
            return
        if fast:
            encodings = _encode_batch(tokenizer, texts)
            tokenized = (_label_encoding(encoding, s) for encoding, s in zip(encodings, spans))
        else:
            tokenized = (_tokenize_pieces(tokenizer, t, s) for t, s in zip(texts, spans))
        for (ids, labels), line in zip(tokenized, lines):
            example, reason = _finish(ids, labels, max_seq_length)
            if example is None:
                drop(reason, line)
                continue
            counts["kept"] += 1
            examples.append(example)
            counts["tokens"] += len(ids)
            counts["label_tokens"] += int((labels != IGNORE_INDEX).sum())

    texts: list[str] = []
    spans: list[list[Span]] = []
    lines: list[int | None] = []
    for conversation in conversations:
        counts["total"] += 1
        messages, tools, line = _parts_of(conversation)
        if not any(m.get("role") == "assistant" for m in messages):
            drop("no_assistant_tokens", line)
            continue
        if uses_tools(messages, tools):
            if not tools_gap:
                tools_gap.append(tool_support_gap(tokenizer))
            if tools_gap[0] is not None:
                drop("tools_unsupported", line)
                continue
        try:
            text, conv_spans = render(messages, tools) if tools else render(messages)
        except Exception:  # the template rejected the conversation (e.g. roles must alternate)
            drop("template_error", line)
            continue
        if not conv_spans:
            drop("no_assistant_tokens", line)
            continue
        texts.append(text)
        spans.append(conv_spans)
        lines.append(line)
        if len(texts) >= TOKENIZE_CHUNK:
            flush(texts, spans, lines)
            texts, spans, lines = [], [], []
    flush(texts, spans, lines)
    if dropped_lines:
        counts["dropped_lines"] = dropped_lines
    return examples, counts
