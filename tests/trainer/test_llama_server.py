"""llama.cpp's own llama-server, the binary the cluster runs, on the exported GGUF of a real run.

The binary is built from the llama.cpp sources that the pinned llama-cpp-python vendors
(scripts/llama-server.sh), the build whose official image the operator pins; it runs with the
arguments of the Deployment the operator generates (only the model path, host and port are
mapped to this machine). Checked: the build is the pinned one, health, the alias, Prometheus
metrics (and the API key on them), a chat completion that stops, the chat template embedded in
the GGUF rendering the prompt exactly as the Hugging Face tokenizer does, concurrent streams
beyond the slots, and README's request-form table, column "llama-server (cluster)", row by row.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
from pathlib import Path

import pytest

from chatbot_operator import settings

from llama_server_support import NAME, QUESTION, chat, free_port, operator_args, request, running

pytestmark = [pytest.mark.slow, pytest.mark.llama_cpp]


@pytest.fixture(scope="module")
def gguf(real_smollm_run) -> Path:
    return real_smollm_run / "bot.f16.gguf"


@pytest.fixture(scope="module")
def server(llama_server_binary, gguf, tmp_path_factory):
    args, env = operator_args(gguf, free_port())
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with running(llama_server_binary, args, env, log) as url:
        yield url, args


def test_the_binary_is_the_build_the_cluster_image_pins(llama_server_binary):
    done = subprocess.run([str(llama_server_binary), "--version"], capture_output=True, text=True, timeout=60)
    version = done.stdout + done.stderr
    script = (Path(__file__).resolve().parents[2] / "scripts" / "llama-server.sh").read_text()
    build = script.split("LLAMA_CPP_BUILD=")[1].split()[0]
    commit = script.split("LLAMA_CPP_COMMIT=")[1].split()[0]
    assert f"(build {build}, commit {commit})" in version, version
    assert settings.DEFAULT_SERVER_IMAGE.endswith(f":server-b{build}")
    assert settings.DEFAULT_SERVER_CUDA_IMAGE.endswith(f":server-cuda-b{build}")


def test_the_operator_arguments_are_the_ones_run(server):
    _, args = server
    flags = {flag: args[args.index(flag) + 1] for flag in ("--alias", "-c", "-np", "--threads-http", "-t")}
    assert "--metrics" in args and flags["--alias"] == NAME
    assert (flags["-c"], flags["-np"], flags["--threads-http"], flags["-t"]) == ("2048", "2", "6", "1")


def test_health_alias_and_metrics(server):
    url, _ = server
    status, body = request(f"{url}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = request(f"{url}/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == NAME
    assert chat(url, {"messages": QUESTION})[0] == 200
    status, body = request(f"{url}/metrics")
    assert status == 200
    text = body.decode()
    assert "llamacpp:prompt_tokens_total" in text and "llamacpp:tokens_predicted_total" in text


def test_a_chat_completion_stops_at_the_end_of_turn(server):
    url, _ = server
    status, body = chat(url, {"messages": QUESTION, "max_tokens": 64, "model": NAME})
    assert status == 200, body
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop", choice
    assert choice["message"]["content"].strip() and "<|im_end|>" not in choice["message"]["content"]
    assert body["model"] == NAME


def test_the_embedded_chat_template_renders_the_prompt_like_hf(server, real_smollm_run, gguf):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    url, _ = server
    field = GGUFReader(str(gguf)).fields["tokenizer.chat_template"]
    embedded = bytes(field.parts[field.data[0]]).decode()
    status, body = request(f"{url}/props")
    assert status == 200 and json.loads(body)["chat_template"] == embedded
    messages = [{"role": "system", "content": "You are Acme's support bot."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "How much is Pro?"}]
    status, body = request(f"{url}/apply-template", {"messages": messages})
    assert status == 200
    hf = AutoTokenizer.from_pretrained(real_smollm_run / "workspace" / "export" / "merged")
    assert json.loads(body)["prompt"] == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                                 tokenize=False)


def test_more_streams_than_slots_all_complete_with_content(server):
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)

    def stream(i: int) -> tuple[str, str | None]:
        text, finish = "", None
        for chunk in client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": f"Say hello to customer {i}."}],
                max_tokens=24, temperature=0, stream=True):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # 2 slots: 2 run, 2 wait
        results = list(pool.map(stream, range(4)))
    assert all(text.strip() and finish in ("stop", "length") for text, finish in results), results


# README's table "Local server and llama-server, request by request", column llama-server.
FORMS = {
    "content as parts": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is"}, {"type": "text", "text": "the capital of France?"}]}]}, 200),
    "n = 2": ({"messages": QUESTION, "n": 2}, 200),
    "n above the slots": ({"messages": QUESTION, "n": 3}, 400),
    "json_schema": ({"messages": QUESTION, "response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                "required": ["ok"]}}}}, 200),
    "json_object": ({"messages": QUESTION, "response_format": {"type": "json_object"}}, 200),
    "stop list": ({"messages": QUESTION, "stop": ["Paris", "\n"]}, 200),
    "max_tokens -1": ({"messages": QUESTION, "max_tokens": -1}, 200),
    "max_tokens 0": ({"messages": QUESTION, "max_tokens": 0}, 200),
    "max_tokens -2": ({"messages": QUESTION, "max_tokens": -2}, 400),
    "empty messages": ({"messages": []}, 200),
    "unknown role": ({"messages": [{"role": "narrator", "content": "Hi"}]}, 200),
    "prompt over the context": ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400),
}


@pytest.mark.parametrize("form", FORMS)
def test_request_forms_as_readme_states(server, form):
    url, _ = server
    body, expected = FORMS[form]
    status, answer = chat(url, body)
    assert status == expected, (form, answer)
    if form == "n = 2":
        assert len(answer["choices"]) == 2
    if form == "json_schema":
        assert isinstance(json.loads(answer["choices"][0]["message"]["content"])["ok"], bool)
    if form == "prompt over the context":
        assert answer["error"]["type"] == "exceed_context_size_error"


def test_stream_usage_errors_for_bad_bodies_and_unknown_paths(server):
    url, _ = server
    status, raw = request(f"{url}/v1/chat/completions", {"messages": QUESTION, "max_tokens": 8, "stream": True,
                                                         "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in raw.decode().splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert status == 200 and events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    assert request(f"{url}/v1/chat/completions", b"{not json")[0] == 500
    for path, method in (("/v1/nothing", "POST"), ("/v1/chat/completions", "GET")):
        status, raw = request(f"{url}{path}", {} if method == "POST" else None, method=method)
        assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error", (path, raw)


def test_with_an_api_key_health_is_public_and_metrics_need_the_key(llama_server_binary, gguf, tmp_path):
    args, env = operator_args(gguf, free_port(), apiKeySecret={"name": "bot-key", "key": "token"})
    assert "LLAMA_API_KEY" not in env  # from the Secret in the cluster; given here by value
    with running(llama_server_binary, args, {**env, "LLAMA_API_KEY": "s3cret"}, tmp_path / "log") as url:
        assert request(f"{url}/health")[0] == 200
        assert request(f"{url}/metrics")[0] == 401
        assert request(f"{url}/metrics", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert chat(url, {"messages": QUESTION, "max_tokens": 4})[0] == 401
        assert chat(url, {"messages": QUESTION, "max_tokens": 4}, **{"X-Api-Key": "s3cret"})[0] == 200
