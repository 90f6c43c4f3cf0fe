"""spec.chatTemplate: a built-in or a Jinja file replaces the base model's chat template.

chatml-tools gives a ChatML model (here a tiny config-built one with ChatML tokens, as SmolLM2
has) the tool format of Qwen2.5: tool rows are then trained, with labels on the assistant's text
and tool calls only; the template is checked against the tokenizer before training, and lands in
the exported GGUF and the Modelfile.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatbot_trainer.data.chat_templates import (
    CHATML_TEMPLATE,
    CHATML_TOOLS_TEMPLATE,
    check_chat_template,
    choose_chat_template,
    tool_support_gap,
)
from chatbot_trainer.data.formats import convert_record
from chatbot_trainer.data.tokenization import IGNORE_INDEX, tokenize_conversation
from chatbot_trainer.errors import InvalidConfig, InvalidData
from chatbot_trainer.export.gguf_writer import strip_generation_tags
from chatbot_trainer.model.base_models import build_scratch_tokenizer

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
RECORD = {
    "messages": [
        {"role": "system", "content": "You answer weather questions."},
        {"role": "user", "content": "What is the weather in Paris and Oslo?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"temp_c": 9}'},
        {"role": "assistant", "content": "Paris has 18 degrees, Oslo 9."},
    ],
    "tools": [WEATHER_TOOL],
}
# The assistant's parts as chatml-tools renders them: what the loss must cover, and nothing else.
ASSISTANT_PARTS = (
    'Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
    "Paris has 18 degrees, Oslo 9.<|im_end|>",
)
QWEN25 = Path(__file__).parent / "chat_templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"


def _tokenizer(specials: list[str], template: str | None = None):
    """A fast tokenizer trained on the record; ChatML tokens only when asked for."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator([json.dumps(RECORD)] * 3, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=specials[-1], pad_token=specials[0])
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture()
def chatml_tokenizer():
    tokenizer = build_scratch_tokenizer([json.dumps(RECORD), CHATML_TOOLS_TEMPLATE] * 5, vocab_size=500)
    assert tokenizer.chat_template is None or tokenizer.chat_template == CHATML_TEMPLATE
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def conversation():
    converted = convert_record(RECORD)
    return converted.messages, converted.tools


def test_chatml_tools_renders_what_qwen25_renders(conversation):
    """Built from Qwen2.5's template: the same text whenever a system message is given."""
    from transformers.utils.chat_template_utils import render_jinja_template

    messages, tools = conversation
    plain = [messages[0], messages[1], {"role": "assistant", "content": "Let me see."}, messages[1]]
    for conv, conv_tools in ((messages, tools), (plain, None), (plain, tools)):
        ours, qwen = (render_jinja_template(conversations=[conv], tools=conv_tools, chat_template=t,
                                            add_generation_prompt=True)[0][0]
                      for t in (strip_generation_tags(CHATML_TOOLS_TEMPLATE), QWEN25.read_text()))
        assert ours == qwen


def test_chatml_tools_labels_assistant_text_and_tool_calls_only(chatml_tokenizer, conversation):
    messages, tools = conversation
    assert tool_support_gap(chatml_tokenizer) is not None  # ChatML alone drops the tool rows
    assert tokenize_conversation(chatml_tokenizer, messages, 1024, tools=tools) is None

    choose_chat_template(chatml_tokenizer, "chatml-tools", "tiny-chatml")
    assert tool_support_gap(chatml_tokenizer) is None
    example = tokenize_conversation(chatml_tokenizer, messages, 1024, tools=tools)
    text = chatml_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    encoding = chatml_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert example["input_ids"].tolist() == encoding["input_ids"]
    spans = []
    for part in ASSISTANT_PARTS:
        assert text.count(part) == 1, part
        start = text.index(part)
        spans.append((start, start + len(part)))
    for untrained in ('{"temp_c": 18}', "Current weather in a city", "What is the weather", "You answer weather"):
        assert untrained in text
    for i, (token_id, (a, b)) in enumerate(zip(encoding["input_ids"], encoding["offset_mapping"])):
        inside = any(s <= a and b <= e for s, e in spans)
        assert inside or all(b <= s or a >= e for s, e in spans), f"token {text[a:b]!r} straddles a boundary"
        expected = token_id if inside and i > 0 else IGNORE_INDEX
        assert example["labels"][i] == expected, f"token {i} {text[a:b]!r}"
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert chatml_tokenizer.decode(trained) == "".join(ASSISTANT_PARTS)


def test_unknown_names_missing_files_and_broken_templates_fail_clearly(chatml_tokenizer, tmp_path):
    with pytest.raises(InvalidConfig, match=r"unknown chatTemplate 'chatml-tool': use a built-in \(chatml, chatml-tools\)"):
        choose_chat_template(chatml_tokenizer, "chatml-tool", "tiny")
    with pytest.raises(InvalidConfig, match="no file at /nowhere/t.jinja"):
        choose_chat_template(chatml_tokenizer, "/nowhere/t.jinja", "tiny")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(InvalidConfig, match="does not render a conversation"):
        choose_chat_template(chatml_tokenizer, str(broken), "tiny")
    assert chatml_tokenizer.chat_template == CHATML_TEMPLATE  # left as it was


def test_a_template_needing_tokens_the_tokenizer_lacks_is_refused(tmp_path):
    plain = _tokenizer(["<|endoftext|>"])
    with pytest.raises(InvalidConfig) as info:
        choose_chat_template(plain, "chatml-tools", "acme/gpt")
    assert info.value.message.startswith(
        "chatTemplate 'chatml-tools' writes <|im_start|>, <|im_end|>, which the tokenizer of acme/gpt "
        "does not have as tokens")
    llama_like = tmp_path / "llama.jinja"
    llama_like.write_text("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
                          "{{ m.content }}<|eot_id|>{% endfor %}")
    with pytest.raises(InvalidConfig, match="writes <|start_header_id|>, <|end_header_id|>, <|eot_id|>"):
        choose_chat_template(plain, str(llama_like), "acme/gpt")
    chatml = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert choose_chat_template(chatml, "chatml-tools", "acme/chatml") == CHATML_TOOLS_TEMPLATE


def test_a_jinja_file_is_used_as_given(chatml_tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "mine.jinja"
    path.write_text(QWEN25.read_text())
    choose_chat_template(chatml_tokenizer, str(path), "tiny")
    assert chatml_tokenizer.chat_template == QWEN25.read_text()
    monkeypatch.chdir(tmp_path)
    chatml_tokenizer.chat_template = CHATML_TEMPLATE
    choose_chat_template(chatml_tokenizer, "./mine.jinja", "tiny")
    assert chatml_tokenizer.chat_template == QWEN25.read_text()
    with pytest.raises(InvalidConfig, match=r"unknown chatTemplate 'mine.jinja'.*\./mine\.jinja"):
        choose_chat_template(chatml_tokenizer, "mine.jinja", "tiny")


def _report(kept: int, tool_rows: list[int]) -> dict:
    return {"unit": "line", "kept": kept, "tools": {"conversations": len(tool_rows), "lines": tool_rows},
            "system_prompts": {"own": kept, "added": 0, "none": 0}}


def test_configure_suggests_chatml_tools_for_a_chatml_model(chatml_tokenizer):
    with pytest.raises(InvalidData) as info:
        check_chat_template(chatml_tokenizer, "smollm", _report(10, [1, 2, 3]), 0.1)
    assert "set chatTemplate: chatml-tools" in info.value.message
    warned = check_chat_template(chatml_tokenizer, "smollm", _report(100, [1]), 0.1)
    assert "set chatTemplate: chatml-tools" in warned["warnings"][0]

    choose_chat_template(chatml_tokenizer, "chatml-tools", "smollm")
    result = check_chat_template(chatml_tokenizer, "smollm", _report(10, [1, 2, 3]), 0.1, chat_template="chatml-tools")
    assert (result["template"], result["tools"], result["warnings"]) == ("chatml-tools", "supported", [])


def test_no_suggestion_for_a_model_without_chatml_tokens():
    from chatbot_trainer.data.chat_templates import CHATML_TEMPLATE as plain_chatml

    llama = _tokenizer(["<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                       template=plain_chatml.replace("<|im_start|>", "<|start_header_id|>"))
    with pytest.raises(InvalidData) as info:
        check_chat_template(llama, "acme/llama", _report(10, [1, 2, 3]), 0.1)
    assert "chatTemplate" not in info.value.message


def test_spec_accepts_names_and_files_only():
    from pydantic import ValidationError

    from chatbot_api.spec import TrainingParams

    for value in ("chatml-tools", "chatml", "/templates/mine.jinja", "./mine.jinja", "pvc://templates/mine.jinja"):
        assert TrainingParams(training_data="/d.jsonl", chat_template=value).chat_template == value
    for value in ("https://example.com/t.jinja", "Chat Template", "s3://bucket/t.jinja"):
        with pytest.raises(ValidationError):
            TrainingParams(training_data="/d.jsonl", chatTemplate=value)


# ---------------------------------------------------------------------------- the steps


def _tool_rows(path: Path, rows: int) -> Path:
    lines = [{**RECORD, "messages": [RECORD["messages"][0], {"role": "user", "content": f"Weather in city {i}?"},
                                     *RECORD["messages"][2:]]} for i in range(rows)]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def test_steps_train_with_chatml_tools_and_export_it_into_gguf_and_modelfile(tmp_path):
    import gguf

    from chatbot_trainer.export import modelfile
    from chatbot_trainer.params import trainer_params
    from chatbot_trainer.steps import run_step
    from chatbot_trainer.workspace import StepContext

    data = _tool_rows(tmp_path / "tools.jsonl", 12)
    params = trainer_params({"training_data": str(data), "model_type": "tiny-gpt", "max_seq_length": 2048,
                             "training_steps": 2, "batch_size": 2, "chat_template": "chatml-tools",
                             "data": {"eval_fraction": 0.2},
                             "evaluation": {"sample_answers": 0}, "export": {"quantizations": ["f16"]}})
    ctx = StepContext(workspace=tmp_path / "ws", params=params, name="bot")
    results = {step: run_step(step, ctx, termination_log=str(tmp_path / f"{step}.msg"))
               for step in ("prepare", "configure", "train", "evaluate", "export")}
    assert results["configure"]["chat_template"]["tools"] == "supported"
    assert results["configure"]["chat_template"]["template"] == "chatml-tools"
    assert results["train"]["tokenization"]["tools_unsupported"] == 0
    (exported,) = results["export"]["files"]
    field = gguf.GGUFReader(exported["path"]).fields["tokenizer.chat_template"]
    embedded = bytes(field.parts[field.data[0]]).decode("utf-8")
    assert embedded == strip_generation_tags(CHATML_TOOLS_TEMPLATE)
    text = Path(results["export"]["modelfile"]).read_text()
    assert modelfile.CHATML_TOOLS_OLLAMA_TEMPLATE in text and "SYSTEM" not in text
