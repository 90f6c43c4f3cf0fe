"""The Ollama Modelfile written beside the exported GGUF.

`ollama create <name> -f Modelfile` in the export folder imports the model. The Modelfile must
make Ollama send the model the text it was trained on:

- TEMPLATE: for ChatML and Llama 3 chat templates, the same prompt format in Ollama's
  Go-template syntax (the `.Messages` form, with the `.System`/`.Prompt`/`.Response` form for
  older Ollama versions). Templates with tools are written for two families, with `.Tools`
  and `.ToolCalls`: ChatML with Qwen2.5's <tool_call> format (Qwen2.5, the trainer's
  chatml-tools) and Llama 3.1/3.2. For any other template TEMPLATE is left out, so Ollama
  uses the template embedded in the GGUF.
- SYSTEM: the system prompt every training conversation without one of its own was rendered
  with: `data.systemPrompt` when set, else the default the model's chat template injects
  (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face"; Qwen2.5:
  "You are Qwen, created by Alibaba Cloud. …"). Ollama puts SYSTEM first when a conversation
  has no system message, as the Hugging Face template does.
- stop PARAMETERs: the template's end-of-turn tokens.

tests/trainer/test_modelfile_go.py executes these templates with Go's text/template (Ollama's
engine) and compares them byte for byte with the Hugging Face rendering. What differs, and why
it cannot be helped in a Go template:

- JSON inside the prompt (tool signatures, call arguments): Ollama encodes them with Go's
  encoding/json, compact, its own field order for signatures (required before properties),
  fields it does not know dropped, and <, >, & escaped as \u003c…; Hugging Face templates use
  json.dumps with ", "/": " (Llama 3.1/3.2 signatures with indent=4). The text around the JSON
  is the same byte for byte.
- Llama 3's `| trim` is done in the template for ASCII whitespace only (Go templates have no
  string functions); other Unicode whitespace around a message is kept.
- Llama 3.1/3.2 write the date "26 Jul 2024" (training renders with the same date; see
  data/chat_templates.TEMPLATE_VARIABLES).
- The legacy form has no tools, and Llama 3.1's system header (cut-off date) only when there
  is a system prompt.
"""

from __future__ import annotations

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
LLAMA3_HEADER, LLAMA3_EOT = "<|start_header_id|>", "<|eot_id|>"
# Sentences of the tool instructions that identify a template family's tool format exactly.
QWEN25_TOOLS_MARKS = (
    "You are provided with function signatures within <tools></tools> XML tags:",
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:",
    "<tool_response>",
)
LLAMA31_TOOLS_MARKS = (
    "Environment: ipython",
    "Cutting Knowledge Date: December 2023",
    "Given the following functions, please respond with a JSON for a function call",
)
# The date the Llama 3.1/3.2 templates write into their system header when the renderer gives
# none; training renders with it too (data/chat_templates.TEMPLATE_VARIABLES), so the served
# prompt carries the date the model was trained with.
LLAMA3_DATE = "26 Jul 2024"

# The legacy form (.System/.Prompt/.Response, for Ollama versions without .Messages) is rendered
# once per completed turn, then once more for the open turn with everything after .Response
# left out; every completed turn therefore ends the way the Hugging Face template ends a turn.
_CHATML_LEGACY = """{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>
{{ end }}"""

# ChatML in Ollama's template language. Every message is rendered in order (Ollama passes the
# SYSTEM prompt as the first message); a final assistant message is left open, so Ollama can
# continue it; otherwise the prompt ends with the assistant header, like add_generation_prompt.
CHATML_OLLAMA_TEMPLATE = """{{- if .Messages }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if not (and $last (eq .Role "assistant")) }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}
""" + _CHATML_LEGACY

# ChatML with tools, as Qwen2.5's template (and the trainer's chatml-tools) writes them: the tool
# signatures in the system turn (after the system message, if any), each call as
# <tool_call>{"name": …, "arguments": …}</tool_call> in the assistant turn, consecutive tool
# results in one user turn as <tool_response> blocks. Ollama writes the JSON of the signatures
# and arguments with Go's encoding/json (compact); the Hugging Face template with json.dumps.
CHATML_TOOLS_OLLAMA_TEMPLATE = """{{- if .Messages }}
{{- $hasSystem := eq (index .Messages 0).Role "system" }}
{{- if .Tools }}<|im_start|>system
{{ if $hasSystem }}{{ (index .Messages 0).Content }}

{{ end }}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{{ else if $hasSystem }}<|im_start|>system
{{ (index .Messages 0).Content }}<|im_end|>
{{ end }}
{{- $prevTool := false }}
{{- range $i, $_ := .Messages }}
{{- $rest := slice $.Messages $i }}
{{- $last := eq (len $rest) 1 }}
{{- if and (eq $i 0) (eq .Role "system") }}
{{- else if eq .Role "tool" }}
{{- if not $prevTool }}<|im_start|>user{{ end }}
<tool_response>
{{ .Content }}
</tool_response>
{{- if not (and (not $last) (eq (index $rest 1).Role "tool")) }}<|im_end|>
{{ end }}
{{- else if and (eq .Role "assistant") .ToolCalls }}<|im_start|>assistant
{{- if .Content }}
{{ .Content }}
{{- end }}
{{- range .ToolCalls }}
<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
</tool_call>
{{- end }}<|im_end|>
{{ else }}<|im_start|>{{ .Role }}
{{ .Content }}{{ if not (and $last (eq .Role "assistant")) }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- $prevTool = eq .Role "tool" }}
{{- end }}
""" + _CHATML_LEGACY

# Jinja's `| trim` in Go's template language (which has no string functions): the text between
# the first and the last byte that is not ASCII whitespace. Both ends are found by a loop that
# stops at the first non-space byte (`break`), so a long message costs no more than a short one;
# the loop from the end reads byte len-1-i as `len (slice $short $i)`, $short being the text
# without its first byte (templates have no arithmetic). Llama 3 templates trim every message.
_WHITESPACE = "(or (eq $b 32) (eq $b 9) (eq $b 10) (eq $b 11) (eq $b 12) (eq $b 13))"
_TRIM = """{{- define "trim" }}
{{- $start := -1 }}
{{- range $i := len $ }}{{ $b := index $ $i }}{{ if not WS }}{{ $start = $i }}{{ break }}{{ end }}{{ end }}
{{- if ge $start 0 }}
{{- $end := len $ }}{{ $short := slice $ 1 }}
{{- range $i := len $ }}{{ $b := index $ (len (slice $short $i)) }}
{{- if not WS }}{{ $end = len (slice $ $i) }}{{ break }}{{ end }}{{ end }}
{{- slice $ $start $end }}
{{- end }}
{{- end }}
""".replace("WS", _WHITESPACE)

_LLAMA3_LEGACY = """{{- else }}
{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}
{{- if .Prompt }}<|start_header_id|>user<|end_header_id|>

{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}{{ .Response }}{{ if .Response }}<|eot_id|>{{ end }}"""

# Llama 3 in Ollama's template language (the BOS token is added by the tokenizer, not here).
LLAMA3_OLLAMA_TEMPLATE = _TRIM + """{{- if .Messages }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ template "trim" .Content }}{{ if not (and $last (eq .Role "assistant")) }}<|eot_id|>{{ end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}
""" + _LLAMA3_LEGACY

# Llama 3.1/3.2 with tools (their Hugging Face templates' defaults: tools in the first user
# message, one call per assistant turn as {"name": …, "parameters": …}, tool results as ipython
# turns holding the result as a JSON string). The system turn always carries the knowledge
# cut-off and the date.
LLAMA31_OLLAMA_TEMPLATE = _TRIM + """{{- if .Messages }}
{{- $hasSystem := eq (index .Messages 0).Role "system" }}
{{- $firstUser := 0 }}{{ if $hasSystem }}{{ $firstUser = 1 }}{{ end -}}
<|start_header_id|>system<|end_header_id|>

{{ if .Tools }}Environment: ipython
{{ end }}Cutting Knowledge Date: December 2023
Today Date: """ + LLAMA3_DATE + """

{{ if $hasSystem }}{{ template "trim" (index .Messages 0).Content }}{{ end }}<|eot_id|>
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if and (eq $i 0) $hasSystem }}
{{- else if and $.Tools (eq $i $firstUser) }}<|start_header_id|>user<|end_header_id|>

Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.

Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.

{{ range $.Tools }}{{ json . }}

{{ end }}{{ template "trim" .Content }}<|eot_id|>
{{- else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>

{{ json .Content }}<|eot_id|>
{{- else if and (eq .Role "assistant") .ToolCalls }}<|start_header_id|>assistant<|end_header_id|>

{{ with index .ToolCalls 0 }}{"name": "{{ .Function.Name }}", "parameters": {{ .Function.Arguments }}}{{ end }}<|eot_id|>
{{- else }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ template "trim" .Content }}{{ if not (and $last (eq .Role "assistant")) }}<|eot_id|>{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}
""" + _LLAMA3_LEGACY

# Sampling defaults for a small chat model; users override them with `ollama run --parameter`
# or in their own Modelfile.
DEFAULT_PARAMETERS: dict[str, float | int] = {
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "repeat_penalty": 1.1,
}
MAX_DEFAULT_NUM_CTX = 4096


def is_chatml(chat_template: str | None) -> bool:
    return bool(chat_template) and IM_START in chat_template and IM_END in chat_template


def is_llama3(chat_template: str | None) -> bool:
    return bool(chat_template) and LLAMA3_HEADER in chat_template and LLAMA3_EOT in chat_template


def is_chatml_tools(chat_template: str | None) -> bool:
    """ChatML with Qwen2.5's tool format (Qwen2.5, the trainer's chatml-tools)."""
    return is_chatml(chat_template) and all(mark in chat_template for mark in QWEN25_TOOLS_MARKS)


def is_llama31(chat_template: str | None) -> bool:
    """Llama 3.1/3.2/3.3 (the system header with the knowledge cut-off, tools as ipython)."""
    return is_llama3(chat_template) and all(mark in chat_template for mark in LLAMA31_TOOLS_MARKS)


def _has_tools(chat_template: str) -> bool:
    return "tool_calls" in chat_template or "tools" in chat_template


def ollama_template(chat_template: str | None) -> str | None:
    """The Go template that renders what `chat_template` renders, or None for other formats.

    Templates with tools are recognised in two families: ChatML with Qwen2.5's <tool_call>
    format, and Llama 3.1/3.2. Other templates with tools give None: Ollama is left to the
    template embedded in the GGUF."""
    if not chat_template:
        return None
    if is_chatml_tools(chat_template):
        return CHATML_TOOLS_OLLAMA_TEMPLATE
    if is_llama31(chat_template):
        return LLAMA31_OLLAMA_TEMPLATE
    if _has_tools(chat_template):
        return None
    if is_chatml(chat_template):
        return CHATML_OLLAMA_TEMPLATE
    if is_llama3(chat_template):
        return LLAMA3_OLLAMA_TEMPLATE
    return None


def stop_tokens(chat_template: str | None, eos_token: str | None, end_of_turn_tokens: list[str] | None = None) -> list[str]:
    """End-of-turn strings Ollama should stop on, most specific first, without duplicates."""
    found: list[str] = []
    if is_chatml(chat_template):
        found += [IM_END, IM_START]
    for token in (end_of_turn_tokens or []) + ([eos_token] if eos_token else []):
        if token and token not in found:
            found.append(token)
    return found


def _quote(value: str, what: str) -> str:
    if '"""' in value:
        raise ValueError(f'the {what} contains """, which a Modelfile cannot quote; remove it')
    return f'"""{value}"""'


def render_modelfile(
    gguf_file: str,
    *,
    chat_template: str | None,
    stops: list[str],
    system_prompt: str | None = None,
    num_ctx: int | None = None,
    parameters: dict[str, float | int] | None = None,
) -> str:
    """Modelfile text. `gguf_file` is the file name beside the Modelfile (FROM ./<file>)."""
    lines = [f"FROM ./{gguf_file}"]
    template = ollama_template(chat_template)
    if template:
        lines.append(f"TEMPLATE {_quote(template, 'template')}")
    if system_prompt:
        lines.append(f"SYSTEM {_quote(system_prompt, 'system prompt')}")
    for token in stops:
        if '"' in token or "\n" in token:
            raise ValueError(f"stop token {token!r} cannot be written as a Modelfile PARAMETER")
        lines.append(f'PARAMETER stop "{token}"')
    params = dict(DEFAULT_PARAMETERS)
    if num_ctx:
        params["num_ctx"] = int(min(num_ctx, MAX_DEFAULT_NUM_CTX))
    params.update(parameters or {})
    for key, value in params.items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"
