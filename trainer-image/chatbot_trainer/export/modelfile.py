"""The Ollama Modelfile written beside the exported GGUF.

`ollama create <name> -f Modelfile` in the export folder imports the model. The Modelfile must
make Ollama send the model the text it was trained on:

- TEMPLATE: for ChatML and Llama 3 chat templates, the same prompt format in Ollama's
  Go-template syntax (the `.Messages` form, with the `.System`/`.Prompt`/`.Response` form for
  older Ollama versions). For any other template TEMPLATE is left out, so Ollama uses the
  template embedded in the GGUF.
- SYSTEM: the system prompt every training conversation without one of its own was rendered
  with: `data.systemPrompt` when set, else the default the model's chat template injects
  (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face"; Qwen2.5:
  "You are Qwen, created by Alibaba Cloud. …"). Ollama puts SYSTEM first when a conversation
  has no system message, as the Hugging Face template does.
- stop PARAMETERs: the template's end-of-turn tokens.

tests/trainer/test_modelfile_go.py executes these templates with Go's text/template (Ollama's
engine) and compares them byte for byte with the Hugging Face rendering.
"""

from __future__ import annotations

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
LLAMA3_HEADER, LLAMA3_EOT = "<|start_header_id|>", "<|eot_id|>"

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

# Llama 3 in Ollama's template language (the BOS token is added by the tokenizer, not here).
LLAMA3_OLLAMA_TEMPLATE = """{{- if .Messages }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if not (and $last (eq .Role "assistant")) }}<|eot_id|>{{ end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}
{{- if .Prompt }}<|start_header_id|>user<|end_header_id|>

{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}{{ .Response }}{{ if .Response }}<|eot_id|>{{ end }}"""

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


def ollama_template(chat_template: str | None) -> str | None:
    """The Go template that renders what `chat_template` renders, or None for other formats.

    None too for templates that express tool calls: these Go templates have no tools, so
    Ollama is left to the template embedded in the GGUF, which keeps them."""
    if chat_template and ("tool_calls" in chat_template or "tools" in chat_template):
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
