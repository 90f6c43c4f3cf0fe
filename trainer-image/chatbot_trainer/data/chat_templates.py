"""Chat templates: the trainer's ChatML, and what a template can express, found by rendering.

ChatML (``CHATML_TEMPLATE``) is given to tokenizers that have no template of their own
(``ensure_chat_template``), with ``{% generation %}`` markers around the assistant's text.

Tool calling: a template supports it when a conversation with a tool definition, an assistant
tool call and the tool's result renders all three (templates without tool support drop the
definitions and render the call as an empty assistant turn). The configure step uses this to
say, before training, that a base model cannot learn the data's tool calls and how many rows
that affects; tokenize_dataset uses it to leave such rows out rather than train on a rendering
that lost them.

The default system prompt a template injects (SmolLM2, Qwen2.5) is read the same way, by
``default_system_prompt``; the configure step reports it beside the data's own system
prompts, and the Modelfile writes it as SYSTEM.

The spec's ``chatTemplate`` replaces the base model's template (``choose_chat_template``): a
built-in (``chatml``, ``chatml-tools``: ChatML with Qwen2.5's tool format, for ChatML models
whose own template has no tools, such as SmolLM2) or a Jinja file. It is checked against the
tokenizer (the special tokens it writes must be tokens of the vocabulary) before training, and
travels with the tokenizer the train step saves into the GGUF and the Modelfile.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from chatbot_trainer.errors import InvalidConfig, InvalidData

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# Variables every rendering passes to the chat template. Llama 3.1/3.2 templates write "Today
# Date: …" into the system turn, from `date_string` or else today's date: fixing it keeps the
# tokenized data the same from day to day and equal to what the exported Modelfile serves.
TEMPLATE_VARIABLES = {"date_string": "26 Jul 2024"}

# ChatML, with {% generation %} markers so transformers can mark the assistant tokens (the
# tokens the loss is computed on). The assistant turn's <|im_end|> is trained too: that is
# what teaches the model to stop. Exporters strip the markers (other engines do not know them).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# ChatML with tools, in Qwen2.5-Instruct's format (the same text as its template renders, without
# its default system prompt): tool signatures in the system turn, each call as
# <tool_call>{"name": …, "arguments": …}</tool_call>, consecutive tool results in one user turn.
# The {% generation %} markers put the loss on the assistant's text and tool calls (and the
# <|im_end|> that ends its turn): not on tool results, definitions or anything else.
CHATML_TOOLS_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {%- if message.content %}
                {{- message.content }}
            {%- endif %}
            {%- for tool_call in message.tool_calls or [] %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if message.content or not loop.first %}
                    {{- '\n' }}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {{- tool_call.arguments | tojson }}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
            {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# chatTemplate names → (template, the special tokens it writes).
BUILTIN_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (CHATML_TEMPLATE, (IM_START, IM_END)),
    "chatml-tools": (CHATML_TOOLS_TEMPLATE, (IM_START, IM_END)),
}
# Text in a template that looks like a special token: <|…|>.
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_.-]+\|>")


def read_chat_template(choice: str, pvc_root: str | None = None) -> str:
    """The template text of a chatTemplate value: a built-in name, a path or pvc:// URI."""
    if choice in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[choice][0]
    builtins = ", ".join(BUILTIN_TEMPLATES)
    if choice.startswith("pvc://"):
        from chatbot_trainer.data.dataset import DataError, pvc_path

        try:
            path = pvc_path(choice, pvc_root)
        except DataError as exc:
            raise InvalidConfig(f"chatTemplate: {exc}") from exc
    elif "/" in choice:
        path = Path(choice)
    else:
        raise InvalidConfig(
            f"unknown chatTemplate {choice!r}: use a built-in ({builtins}), the path of a Jinja file "
            "(with a /: /templates/mine.jinja, ./mine.jinja) or pvc://<claim>/<path>"
        )
    if not path.is_file():
        raise InvalidConfig(f"chatTemplate {choice!r}: no file at {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise InvalidConfig(f"chatTemplate {choice!r}: the file {path} is empty")
    return text


def template_special_tokens(template: str) -> list[str]:
    """The special tokens (<|…|>) a template writes, in order of first appearance."""
    return list(dict.fromkeys(_SPECIAL_TOKEN.findall(template)))


def choose_chat_template(tokenizer, choice: str, model: str, pvc_root: str | None = None) -> str:
    """Give ``tokenizer`` the chatTemplate ``choice``, after checking it fits the tokenizer.

    Raises :class:`InvalidConfig` when the name is unknown, the file is missing, the template
    does not render a conversation, or it writes special tokens the vocabulary does not have
    (they would be split into plain text pieces, and the model would never see its turn
    markers). Returns the template."""
    template = read_chat_template(choice, pvc_root)
    vocab = tokenizer.get_vocab()
    needed = BUILTIN_TEMPLATES[choice][1] if choice in BUILTIN_TEMPLATES else template_special_tokens(template)
    missing = [token for token in needed if token not in vocab]
    if missing:
        raise InvalidConfig(
            f"chatTemplate {choice!r} writes {', '.join(missing)}, which the tokenizer of {model} "
            f"does not have as tokens: use a template written with this model's own special "
            f"tokens, or leave chatTemplate unset to use the model's template"
        )
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        render_jinja_template(
            conversations=[[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]],
            chat_template=template, **dict(tokenizer.special_tokens_map), **TEMPLATE_VARIABLES,
        )
    except Exception as exc:
        raise InvalidConfig(
            f"chatTemplate {choice!r} does not render a conversation ({type(exc).__name__}: {exc})"
        ) from exc
    tokenizer.chat_template = template
    return template


def is_chatml_tokenizer(tokenizer) -> bool:
    """Whether the vocabulary has ChatML's turn tokens (chatml-tools fits it)."""
    vocab = tokenizer.get_vocab()
    return IM_START in vocab and IM_END in vocab


def ensure_chat_template(tokenizer) -> list[str]:
    """Give a tokenizer without a chat template ChatML (adding its special tokens).

    Returns the tokens that were added: their embeddings are new and must be trained.
    """
    if tokenizer.chat_template:
        return []
    missing = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if ENDOFTEXT not in tokenizer.get_vocab() else ENDOFTEXT
    return missing


_MARK = "\x00system-prompt-here\x00"


def default_system_prompt(chat_template: str | None, special_tokens: dict[str, str] | None = None) -> str | None:
    """The system prompt `chat_template` adds to a conversation that has none, or None.

    The template is rendered once with a marker as the system message and once without one;
    when the text without has exactly the marker's prefix and suffix, what lies between them
    is the default. Templates whose default depends on the date or on tools give None."""
    if not chat_template:
        return None
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages) -> str:
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=chat_template, add_generation_prompt=True,
            **(special_tokens or {}),
        )
        return rendered[0]

    user = {"role": "user", "content": "Hello"}
    try:
        with_marker = render([{"role": "system", "content": _MARK}, user])
        without = render([user])
    except Exception:  # a template that needs other variables: no default we can read
        return None
    if _MARK not in with_marker:
        return None
    prefix, suffix = with_marker.split(_MARK, 1)
    if not (without.startswith(prefix) and without.endswith(suffix)) or len(without) < len(prefix) + len(suffix):
        return None
    found = without[len(prefix): len(without) - len(suffix)]
    return found or None


PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_lookup",
        "description": "Probe description 5c1e",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "what to look up"}},
            "required": ["query"],
        },
    },
}
# A 9-character alphanumeric call id: Mistral's template refuses any other.
PROBE_CONVERSATION = [
    {"role": "user", "content": "Probe question 5c1e"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "probe5c1e",
                "type": "function",
                "function": {"name": "probe_lookup", "arguments": {"query": "probe argument 5c1e"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "probe5c1e", "name": "probe_lookup", "content": "Probe result 5c1e"},
    {"role": "assistant", "content": "Probe answer 5c1e"},
]
_EXPECTED = (
    ("Probe description 5c1e", "the tool definitions"),
    ("probe argument 5c1e", "the assistant's tool calls"),
    ("Probe result 5c1e", "the tool results"),
)
TOOL_TEMPLATE_EXAMPLES = "Qwen/Qwen2.5-0.5B-Instruct or meta-llama/Llama-3.2-1B-Instruct"


def template_tool_support_gap(chat_template: str | None, special_tokens: dict[str, Any] | None = None) -> str | None:
    """None when ``chat_template`` renders tool definitions, calls and results; else what it lacks."""
    if not chat_template:
        return "there is no chat template"
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            conversations=[PROBE_CONVERSATION],
            tools=[PROBE_TOOL],
            chat_template=chat_template,
            **(special_tokens or {}),
        )
    except Exception as exc:  # the template raised (raise_exception) or needs other variables
        return f"it fails on a tool-calling conversation ({type(exc).__name__}: {exc})"
    missing = [what for marker, what in _EXPECTED if marker not in rendered[0]]
    return f"it leaves out {' and '.join(missing)}" if missing else None


def tool_support_gap(tokenizer) -> str | None:
    """:func:`template_tool_support_gap` for a tokenizer's chat template."""
    template = tokenizer.chat_template
    if not isinstance(template, str):
        return "there is no chat template" if not template else "it has several named chat templates"
    return template_tool_support_gap(template, dict(tokenizer.special_tokens_map))


def _lines(entry: dict[str, Any], unit: str, shown: int = 5) -> str:
    lines = entry.get("lines", [])[:shown]
    more = ", …" if entry.get("conversations", 0) > len(lines) else ""
    return f"{unit}{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}{more}"


def check_chat_template(
    tokenizer, model: str, data_report: dict[str, Any], max_unusable_fraction: float,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """What the base model's chat template means for the prepared data, before training.

    ``chat_template`` is the spec's chatTemplate the tokenizer was given, if any.
    Returns ``{"template", "tools": "supported" | "unsupported" | "not used", "tools_gap",
    "tool_conversations", "tool_definitions_only", "default_system_prompt",
    "conversations_without_system_prompt",
    "warnings": [...], "notes": [...]}``.
    Raises :class:`InvalidData` when the template cannot express tools and more than
    ``max_unusable_fraction`` of the kept conversations use them (training would silently
    lose them); a smaller share gives a warning: those rows are left out of training.
    """
    warnings: list[str] = []
    unit = data_report.get("unit", "line")
    kept = int(data_report.get("kept", 0))
    tool_rows = data_report.get("tools") or {"conversations": 0, "lines": []}
    calls = int(tool_rows.get("conversations", 0))
    define_only = int(tool_rows.get("define_only", 0))
    count = calls + define_only  # a template without tools loses the definitions of both
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    chosen = chat_template or None
    whose = (
        f"{model} (chatTemplate {chosen})" if chosen
        else f"{model} (the trainer's ChatML template)" if template == CHATML_TEMPLATE
        else model
    )
    gap = tool_support_gap(tokenizer) if count else None
    suggestion = (
        "set chatTemplate: chatml-tools (ChatML with tools, for this model's <|im_start|>/<|im_end|> tokens)"
        if gap and is_chatml_tokenizer(tokenizer)
        else None
    )
    if count and gap:
        used = []
        if calls:
            used.append(f"{calls} of {kept} conversations call tools ({_lines(tool_rows, unit)})")
        if define_only:
            only = {"conversations": define_only, "lines": tool_rows.get("define_only_lines", [])}
            used.append(f"{define_only}{' more' if calls else f' of {kept} conversations'} only define "
                        f"tools ({_lines(only, unit)})")
        problem = f"the chat template of {whose} cannot express tool calls ({gap}): {' and '.join(used)}"
        if kept and count / kept > max_unusable_fraction:
            raise InvalidData(
                f"{problem}; {suggestion + ', or ' if suggestion else ''}choose a base model whose "
                f"template supports tools (e.g. {TOOL_TEMPLATE_EXAMPLES}), or remove those rows, or "
                "raise data.maxBadLineFraction to train without them"
            )
        warnings.append(f"{problem}; they are left out of training{' (' + suggestion + ')' if suggestion else ''}")

    notes: list[str] = []
    default = default_system_prompt(template, dict(tokenizer.special_tokens_map)) if template else None
    prompts = data_report.get("system_prompts") or {}
    without = int(prompts.get("none", 0))
    if default and without:
        notes.append(
            f"{without} of {kept} conversations have no system message, so the chat template of "
            f"{model} gives them its default system prompt {default!r}; set data.systemPrompt "
            "to use another"
        )
    return {
        "template": chosen or ("the trainer's ChatML" if template == CHATML_TEMPLATE else "the base model's"),
        "tools": "not used" if not count else ("unsupported" if gap else "supported"),
        "tools_gap": gap,
        "tool_conversations": calls,
        "tool_definitions_only": define_only,
        "default_system_prompt": default,
        "conversations_without_system_prompt": without,
        "warnings": warnings,
        "notes": notes,
    }
