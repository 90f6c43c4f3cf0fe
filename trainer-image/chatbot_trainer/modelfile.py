"""The Ollama Modelfile written beside the exported GGUF.

`ollama create <name> -f Modelfile` in the export folder imports the model. For a ChatML chat
template the Modelfile carries the same prompt format in Ollama's Go-template syntax (the
`.Messages` form, with the `.System`/`.Prompt`/`.Response` form for older Ollama versions). For
any other template it leaves TEMPLATE out, so Ollama uses the template embedded in the GGUF, and
keeps the stop parameters either way.
"""

from __future__ import annotations

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

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
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""

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
    if is_chatml(chat_template):
        lines.append(f"TEMPLATE {_quote(CHATML_OLLAMA_TEMPLATE, 'template')}")
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
