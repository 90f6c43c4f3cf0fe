"""Tool-calling conversations: rendered with a template that supports tools, labelled on the
assistant's text and tool calls only (checked token by token), left out and reported where the
template cannot express tools, and still expressible by the exported GGUF's template."""

from __future__ import annotations

import json

import pytest

from chatbot_trainer.data.chat_templates import (
    CHATML_TEMPLATE,
    PROBE_CONVERSATION,
    PROBE_TOOL,
    check_chat_template,
    template_tool_support_gap,
    tool_support_gap,
)
from chatbot_trainer.data.formats import convert_record
from chatbot_trainer.data.tokenization import (
    IGNORE_INDEX,
    tokenize_conversation,
    tokenize_dataset,
)
from chatbot_trainer.errors import InvalidData
from chatbot_trainer.export import gguf_writer
from chatbot_trainer.model.base_models import build_scratch_tokenizer

# A ChatML template with tools in the style of Qwen2.5's: the tool definitions go into the
# system turn, calls into <tool_call> tags, results into a user turn of <tool_response> tags;
# without a system message it injects a default one.
TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
RECORD = {  # OpenAI fine-tuning format, arguments as JSON text
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18, "sky": "cloudy"}'},
        {"role": "assistant", "content": "It is 18 degrees and cloudy in Paris."},
    ],
    "tools": [WEATHER_TOOL],
}
# What the template renders for the two assistant turns, each ended by <|im_end|>.
ASSISTANT_PARTS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
    "It is 18 degrees and cloudy in Paris.<|im_end|>",
)


def _with_template(tokenizer, template: str):
    from transformers import PreTrainedTokenizerFast

    clone = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token=tokenizer.bos_token,
                                    eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
    clone.chat_template = template
    return clone


@pytest.fixture(scope="module")
def chatml_tokenizer():
    texts = [json.dumps(RECORD), TOOLS_TEMPLATE, "the quick brown fox jumps over the lazy dog"] * 5
    return build_scratch_tokenizer(texts, vocab_size=500)


@pytest.fixture(scope="module")
def tools_tokenizer(chatml_tokenizer):
    return _with_template(chatml_tokenizer, TOOLS_TEMPLATE)


@pytest.fixture(scope="module")
def conversation():
    converted = convert_record(RECORD)
    return converted.messages, converted.tools


def test_labels_cover_assistant_text_and_tool_calls_token_by_token(tools_tokenizer, conversation):
    messages, tools = conversation
    example = tokenize_conversation(tools_tokenizer, messages, 1024, tools=tools)
    text = tools_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    encoding = tools_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert example["input_ids"].tolist() == encoding["input_ids"]

    spans = []
    for part in ASSISTANT_PARTS:
        assert text.count(part) == 1
        start = text.index(part)
        spans.append((start, start + len(part)))
    for must_not_train in ('{"temp_c": 18, "sky": "cloudy"}', "Current weather in a city", "What is the weather"):
        assert must_not_train in text

    labels = example["labels"]
    for i, (token_id, (a, b)) in enumerate(zip(encoding["input_ids"], encoding["offset_mapping"])):
        inside = any(s <= a and b <= e for s, e in spans)
        outside = all(b <= s or a >= e for s, e in spans)
        assert inside or outside, f"token {i} {text[a:b]!r} straddles an assistant boundary"
        expected = token_id if inside and i > 0 else IGNORE_INDEX
        assert labels[i] == expected, f"token {i} {text[a:b]!r}: label {labels[i]}, expected {expected}"
    trained = tools_tokenizer.decode([t for t, lab in zip(example["input_ids"], labels) if lab != IGNORE_INDEX])
    assert trained == "".join(ASSISTANT_PARTS)


def test_dataset_rows_with_tools_tokenize_with_their_tools(tools_tokenizer, conversation):
    messages, tools = conversation
    plain = {"line": 2, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    examples, counts = tokenize_dataset(tools_tokenizer, [{"line": 1, "messages": messages, "tools": tools}, plain], 1024)
    assert counts["kept"] == 2 and counts["tools_unsupported"] == 0
    assert "dropped_lines" not in counts


def test_template_without_tools_drops_tool_rows_and_says_where(chatml_tokenizer, conversation):
    messages, tools = conversation
    plain = {"line": 2, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    examples, counts = tokenize_dataset(chatml_tokenizer, [{"line": 7, "messages": messages, "tools": tools}, plain], 1024)
    assert counts["kept"] == 1 and counts["tools_unsupported"] == 1
    assert counts["dropped_lines"] == {"tools_unsupported": [7]}
    assert tokenize_conversation(chatml_tokenizer, messages, 1024, tools=tools) is None


def test_tool_support_gap(tools_tokenizer, chatml_tokenizer):
    assert tool_support_gap(tools_tokenizer) is None
    assert tool_support_gap(chatml_tokenizer) == "it leaves out the tool definitions and the assistant's tool calls"
    strict = "{{ raise_exception('tools are not supported') }}"
    assert template_tool_support_gap(strict).startswith("it fails on a tool-calling conversation")
    assert template_tool_support_gap(None) == "there is no chat template"


def _report(kept: int, tool_rows: list[int], without_system: int = 0) -> dict:
    return {"unit": "line", "kept": kept, "tools": {"conversations": len(tool_rows), "lines": tool_rows},
            "system_prompts": {"own": kept - without_system, "added": 0, "none": without_system}}


def test_configure_check_fails_naming_model_and_rows(chatml_tokenizer):
    with pytest.raises(InvalidData) as info:
        check_chat_template(chatml_tokenizer, "acme/tiny-chat", _report(10, [2, 3, 5, 8, 9, 12]), 0.1)
    message = info.value.message
    assert "the chat template of acme/tiny-chat (the trainer's ChatML template) cannot express tool calls" in message
    assert "6 of 10 conversations call tools (lines 2, 3, 5, 8, 9, …)" in message
    assert "choose a base model whose template supports tools" in message


def test_configure_check_warns_when_few_rows_use_tools(chatml_tokenizer):
    result = check_chat_template(chatml_tokenizer, "acme/tiny-chat", _report(100, [4]), 0.1)
    assert result["tools"] == "unsupported"
    (warning,) = result["warnings"]
    assert "1 of 100 conversations call tools (line 4)" in warning and "left out of training" in warning


def test_configure_check_reports_tools_and_default_system_prompt(tools_tokenizer, chatml_tokenizer):
    result = check_chat_template(tools_tokenizer, "acme/tool-chat", _report(10, [1, 2], without_system=4), 0.1)
    assert (result["tools"], result["tools_gap"], result["warnings"]) == ("supported", None, [])
    assert result["default_system_prompt"] == "You are a helpful assistant."
    assert "4 of 10 conversations have no system message" in result["notes"][0]
    plain = check_chat_template(chatml_tokenizer, "acme/tiny-chat", _report(10, []), 0.1)
    assert (plain["tools"], plain["default_system_prompt"], plain["warnings"]) == ("not used", None, [])


@pytest.fixture(scope="module")
def exported_gguf(tmp_path_factory, tools_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    tmp = tmp_path_factory.mktemp("tools-gguf")
    config = Qwen2Config(vocab_size=len(tools_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "model")
    tools_tokenizer.save_pretrained(tmp / "model")
    return gguf_writer.write_gguf(tmp / "model", tmp / "tools.f16.gguf", "f16", name="tools-bot").path


def test_exported_gguf_template_keeps_tool_support(exported_gguf):
    import gguf

    field = gguf.GGUFReader(exported_gguf).fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode("utf-8")
    assert template_tool_support_gap(template) is None


@pytest.mark.llama_cpp
def test_llama_cpp_renders_tools_with_the_embedded_template(exported_gguf):
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(str(exported_gguf), vocab_only=True, verbose=False)
    try:
        template = llm.metadata["tokenizer.chat_template"]
    finally:
        llm.close()
    prompt = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|endoftext|>")(
        messages=PROBE_CONVERSATION, tools=[PROBE_TOOL]).prompt
    for marker in ("Probe description 5c1e", "probe argument 5c1e", "Probe result 5c1e"):
        assert marker in prompt
    assert prompt.count("<tool_call>") == 1


# ---------------------------------------------------------------------------- the steps


def _tool_data(path, tool_rows: int, plain_rows: int):
    rows = [{**RECORD, "messages": [{**RECORD["messages"][0], "content": f"Weather in city {i}?"},
                                    *RECORD["messages"][1:]]} for i in range(tool_rows)]
    rows += [{"messages": [{"role": "user", "content": f"Question {i}?"},
                           {"role": "assistant", "content": f"Answer {i}."}]} for i in range(plain_rows)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _run_steps(tmp_path, data, *steps):
    from chatbot_trainer.params import trainer_params
    from chatbot_trainer.steps import run_step
    from chatbot_trainer.workspace import StepContext

    params = trainer_params({"training_data": str(data), "model_type": "tiny-gpt", "max_seq_length": 256})
    ctx = StepContext(workspace=tmp_path / "ws", params=params, name="bot")
    return [run_step(step, ctx, termination_log=str(tmp_path / f"{step}.msg")) for step in steps]


def test_prepare_counts_tool_rows_and_configure_refuses_a_template_without_tools(tmp_path):
    data = _tool_data(tmp_path / "tools.jsonl", tool_rows=3, plain_rows=17)
    (prepared,) = _run_steps(tmp_path, data, "prepare")
    assert prepared["report"]["tools"] == {"conversations": 3, "lines": [1, 2, 3], "define_only": 0,
                                           "define_only_lines": []}
    assert prepared["summary"]["tool_conversations"] == 3
    with pytest.raises(InvalidData) as info:
        _run_steps(tmp_path, data, "configure")
    assert "the chat template of tiny-gpt" in info.value.message
    assert "set chatTemplate: chatml-tools" in info.value.message  # the model has ChatML's tokens
    assert "3 of 20 conversations call tools (lines 1, 2, 3)" in info.value.message
    message = json.loads((tmp_path / "configure.msg").read_text())
    assert message["reason"] == "InvalidData" and "tools" in message["message"]


def test_configure_warns_when_a_few_rows_use_tools(tmp_path):
    data = _tool_data(tmp_path / "tools.jsonl", tool_rows=1, plain_rows=19)
    _, configured = _run_steps(tmp_path, data, "prepare", "configure")
    assert configured["chat_template"]["tools"] == "unsupported"
    assert "1 of 20 conversations call tools (line 1)" in configured["summary"]["warnings"][0]


def test_modelfile_leaves_a_tool_template_to_the_gguf():
    from chatbot_trainer.export import modelfile

    assert modelfile.ollama_template(TOOLS_TEMPLATE) is None
    assert modelfile.ollama_template(CHATML_TEMPLATE) == modelfile.CHATML_OLLAMA_TEMPLATE


def test_rows_that_only_define_tools_are_counted_apart(chatml_tokenizer):
    from chatbot_trainer.data.dataset import prepare_conversations, report_summary

    from tool_data import openai_rows, tool_conversations

    conversations = tool_conversations(30)
    data = prepare_conversations(openai_rows(conversations), eval_fraction=0)
    tools = data.report["tools"]
    calling = [c for c in data.train if any(m["role"] == "tool" for m in c["messages"])]
    assert tools["conversations"] == len(calling) and tools["lines"] == [c["line"] for c in calling][:20]
    assert tools["define_only"] == data.report["kept"] - len(calling) > 0
    summary = report_summary(data.report)
    assert (summary["tool_conversations"], summary["tool_definitions_only"]) == (tools["conversations"],
                                                                                 tools["define_only"])
    with pytest.raises(InvalidData) as info:
        check_chat_template(chatml_tokenizer, "acme/tiny-chat", data.report, 0.1)
    assert (f"{tools['conversations']} of {data.report['kept']} conversations call tools (records "
            f"{', '.join(map(str, tools['lines'][:5]))}, …) and {tools['define_only']} more only define tools "
            f"(records {', '.join(map(str, tools['define_only_lines'][:5]))}, …)") in info.value.message
