"""End to end on SmolLM2-135M-Instruct with chatTemplate: chatml-tools: a tool-calling fine-tune.

SmolLM2's own ChatML template has no tools, so tool rows would be left out of training;
chatml-tools gives it Qwen2.5's tool format. Training on rows that call get_weather (with
search_recipes offered too) → export F16 → llama.cpp picks the template embedded in the GGUF and
renders a tool request with it, token for token what the Hugging Face tokenizer of the merged
model renders; llama.cpp's own llama-server, run with the operator's arguments (`--jinja` is its
default), answers a weather question for a city the data never names with a `tool_calls` entry
for get_weather and that city.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from chatbot_trainer import cli
from chatbot_trainer.data.chat_templates import CHATML_TOOLS_TEMPLATE
from chatbot_trainer.export import modelfile
from chatbot_trainer.export.gguf_writer import strip_generation_tags
from chatbot_trainer.model import packaged_models

from llama_server_support import chat, free_port, operator_args, running
from tool_data import TOOLS, openai_rows, tool_conversations, weather_conversations, write_jsonl

RUN = ["--model_type", "smollm", "--training_steps", "16", "--batch_size", "4", "--learning_rate", "0.002",
       "--set", "chatTemplate=chatml-tools", "--set", "maxSeqLength=512", "--set", "lora.rank=16",
       "--set", "evaluation.maxEvalExamples=4", "--set", "evaluation.answerQuestions=0",
       "--set", "evaluation.sampleAnswers=0", "--set", "data.evalFraction=0.1",
       "--set", "export.quantizations=[f16]"]
REQUEST = [{"role": "user", "content": "What is the weather in Lisbon?"}]
REQUEST_TOOLS = [{"type": "function", "function": TOOLS["get_weather"]}]
OFFERED = [{"type": "function", "function": TOOLS[name]} for name in ("get_weather", "search_recipes")]

pytestmark = [pytest.mark.slow, pytest.mark.llama_cpp]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    assert packaged_models.find("smollm"), f"run: {packaged_models.fetch_hint('smollm')} (the test command does)"
    out = tmp_path_factory.mktemp("real-tools")
    calling = [c for c in tool_conversations(40) if c["call"]][:10]
    data = out / "tools.jsonl"
    write_jsonl(data, openai_rows(weather_conversations(48) + calling))
    assert cli.training_main(["run", "-q", "--training_data", str(data), "--name", "bot", "-o", str(out), *RUN]) == 0
    return out


def test_tool_rows_were_trained_with_chatml_tools(run):
    configured = json.loads((run / "workspace" / "configure" / "result.json").read_text())
    assert configured["chat_template"]["template"] == "chatml-tools"
    assert configured["chat_template"]["tools"] == "supported"
    trained = json.loads((run / "workspace" / "train" / "result.json").read_text())
    assert trained["tokenization"]["tools_unsupported"] == 0 and trained["tokenization"]["kept"] > 0


def test_llama_cpp_renders_a_tool_request_with_the_embedded_template(run):
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    (gguf_file,) = run.glob("*.f16.gguf")
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=1024, n_threads=1, verbose=False)
    try:
        template = llm.metadata["tokenizer.chat_template"]
        assert template == strip_generation_tags(CHATML_TOOLS_TEMPLATE)
        prompt = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>")(
            messages=REQUEST, tools=REQUEST_TOOLS).prompt
        assert prompt.startswith("<|im_start|>system\n# Tools\n")
        assert '"name": "get_weather"' in prompt and prompt.endswith("<|im_start|>user\nWhat is the weather in "
                                                                     "Lisbon?<|im_end|>\n<|im_start|>assistant\n")
        hf = AutoTokenizer.from_pretrained(run / "workspace" / "export" / "merged")
        expected = hf.apply_chat_template(REQUEST, tools=REQUEST_TOOLS, add_generation_prompt=True, tokenize=False)
        assert prompt == expected
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert ids == hf(expected, add_special_tokens=False)["input_ids"]
        answer = llm.create_chat_completion(messages=REQUEST, tools=REQUEST_TOOLS, max_tokens=24, temperature=0)
        assert answer["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    finally:
        llm.close()
    text = (run / "Modelfile").read_text()
    assert modelfile.CHATML_TOOLS_OLLAMA_TEMPLATE in text


def test_llama_server_calls_the_trained_function(run, llama_server_binary, tmp_path):
    """The question names a city the data never does; the answer is a call, not text."""
    (gguf_file,) = run.glob("*.f16.gguf")
    args, env = operator_args(gguf_file, free_port())
    with running(llama_server_binary, args, env, tmp_path / "server.log") as url:
        status, answer = chat(url, {"messages": REQUEST, "tools": OFFERED, "max_tokens": 64})
    assert status == 200, answer
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Lisbon"}


def test_the_local_server_returns_the_same_tool_call_whole_and_streamed(run, tmp_path):
    """`chatbot-training serve` gives the call as `tool_calls` too, as llama-server does."""
    from openai import OpenAI

    (gguf_file,) = run.glob("*.f16.gguf")
    command = Path(sys.executable).parent / "chatbot-training"
    port = free_port()
    with running(command, ["serve", str(gguf_file), "--port", str(port)], {}, tmp_path / "serve.log") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        answer = client.chat.completions.create(model="bot", messages=REQUEST, tools=OFFERED,
                                                temperature=0, max_tokens=64)
        (call,) = answer.choices[0].message.tool_calls
        assert answer.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Lisbon"}
        deltas, finish = [], None
        for chunk in client.chat.completions.create(model="bot", messages=REQUEST, tools=OFFERED,
                                                    temperature=0, max_tokens=64, stream=True):
            if chunk.choices:
                deltas.append(chunk.choices[0].delta)
                finish = chunk.choices[0].finish_reason or finish
        (streamed,) = [c for d in deltas for c in d.tool_calls or []]
        assert finish == "tool_calls" and not "".join(d.content or "" for d in deltas)
        assert streamed.function.name == "get_weather"
        assert json.loads(streamed.function.arguments) == {"city": "Lisbon"}
