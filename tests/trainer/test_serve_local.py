"""`chatbot-training serve` and `chatbot-training chat` on a GGUF file exported in the test.

A tiny Llama is trained for a moment to answer one ChatML question and stop, exported by the
export step (Q8_0), and then served as a user would: the command in a subprocess on a free
port, spoken to over HTTP; `chat` in a pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from chatbot_api.spec import TrainingParams
from chatbot_trainer.model import base_models as models
from chatbot_trainer.steps import run_step
from chatbot_trainer.workspace import StepContext

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (scripts/bootstrap.sh --llama)")
pytest.importorskip("uvicorn", reason="needs the serve extra")
pytestmark = pytest.mark.llama_cpp

REPO_ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital of France."
ALIAS = "tiny-bot"
TEXTS = [f"user\n{QUESTION}", f"assistant\n{ANSWER}", "user\nHello there, how are you?",
         "assistant\nI am fine, thanks for asking!"] * 30


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    """A tiny Llama that answers QUESTION with ANSWER and stops, exported as Q8_0."""
    from peft import LoraConfig, get_peft_model

    tmp = tmp_path_factory.mktemp("serve")
    tokenizer = models.build_scratch_tokenizer(TEXTS, vocab_size=400)
    base = models.build_scratch_model(models.TINY_LLAMA, tokenizer, max_positions=96, seed=0)
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    sample = torch.tensor([tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]])
    optim = torch.optim.AdamW(base.parameters(), lr=1e-2)
    base.train()
    for _ in range(120):
        base(sample, labels=sample).loss.backward()
        optim.step()
        optim.zero_grad()
    base.eval()
    base.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    # An adapter that changes nothing (LoRA B starts at zero): the export merges it.
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp / "adapter")
    ws = tmp / "ws"
    (ws / "configure").mkdir(parents=True)
    (ws / "train").mkdir()
    (ws / "configure" / "result.json").write_text(json.dumps({"base_model": {"label": "tiny"}}))
    (ws / "train" / "result.json").write_text(json.dumps(
        {"base_model_path_for_adapter": str(tmp / "base"), "adapter_path": str(tmp / "adapter")}))
    params = TrainingParams.model_validate({"trainingData": "unused.jsonl",
                                            "export": {"quantizations": ["q8_0"]}})
    result = run_step("export", StepContext(workspace=ws, params=params, name=ALIAS),
                      termination_log=str(tmp / "termination-log"))
    (path,) = [f["path"] for f in result["files"]]
    assert Path(path).name == f"{ALIAS}.q8_0.gguf"
    return Path(path)


def cli(*args: str) -> list[str]:
    """`chatbot-training ARGS` with this checkout's code."""
    return [sys.executable, "-c", "import sys; from chatbot_trainer.cli import training_main; "
            "sys.exit(training_main())", *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "operator"),
                                           str(REPO_ROOT / "trainer-image")])}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, b""


class Server:
    def __init__(self, model: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            cli("serve", str(model), "--port", str(self.port), "--ctx", "256", "--threads", "1"),
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.health: list[int] = []

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read()
            status, _ = call(f"{self.url}/health", timeout=5)
            self.health.append(status)
            if status == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"not ready after {timeout} s: {self.health[-5:]}")

    def chat(self, **body) -> tuple[int, bytes]:
        return call(f"{self.url}/v1/chat/completions", json.dumps(body).encode())

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="module")
def server(gguf: Path):
    running = Server(gguf)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


QUESTION_MESSAGES = [{"role": "user", "content": QUESTION}]


def test_chat_completion_answers_and_stops_at_end_of_turn(server: Server):
    status, body = server.chat(model=ALIAS, messages=QUESTION_MESSAGES, temperature=0,
                               max_tokens=32)
    assert status == 200, body
    answer = json.loads(body)
    (choice,) = answer["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == ANSWER
    assert choice["finish_reason"] == "stop"  # the end-of-turn token, long before max_tokens
    assert 0 < answer["usage"]["completion_tokens"] < 32


def test_streaming_sends_server_sent_events(server: Server):
    status, body = server.chat(messages=QUESTION_MESSAGES, temperature=0, max_tokens=32,
                               stream=True)
    assert status == 200
    events = [line.removeprefix("data: ") for line in body.decode().splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks]
    assert len([p for p in pieces if p]) > 1  # token by token
    assert "".join(pieces) == ANSWER
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_models_lists_the_alias(server: Server):
    status, body = call(f"{server.url}/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == [ALIAS]


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"messages": "hello"}).encode(), "messages"),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"messages": QUESTION_MESSAGES, "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"messages": QUESTION_MESSAGES, "temperature": "hot"}).encode(), "temperature"),
], ids=["not-json", "not-an-object", "messages-string", "no-messages", "max-tokens-0",
        "temperature-string"])
def test_bad_requests_get_400_json_errors(server: Server, body: bytes, param: str | None):
    status, answer = call(f"{server.url}/v1/chat/completions", body)
    assert status == 400, answer
    error = json.loads(answer)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    # the server keeps answering
    assert server.chat(messages=QUESTION_MESSAGES, temperature=0, max_tokens=32)[0] == 200


# ---------------------------------------------------------------------------- what clients send


def openai_client(server: Server, **options):
    openai = pytest.importorskip("openai", reason="needs the official openai client (test extra)")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, **options)


def test_eight_concurrent_streams_all_complete_with_the_openai_client(server: Server):
    """Eight users at once: every stream gets the whole answer and a finish_reason (llama-cpp-
    python's own server interrupted all but one, leaving them empty without an error)."""
    from concurrent.futures import ThreadPoolExecutor

    client = openai_client(server)

    def ask(_: int) -> tuple[str, str | None]:
        text, finish = [], None
        for chunk in client.chat.completions.create(
                model=ALIAS, messages=QUESTION_MESSAGES, temperature=0, max_tokens=32,
                stream=True, timeout=120):
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        return "".join(text), finish

    def ask_whole(_: int) -> str:
        return client.chat.completions.create(model=ALIAS, messages=QUESTION_MESSAGES,
                                              temperature=0, max_tokens=32,
                                              timeout=120).choices[0].message.content

    with ThreadPoolExecutor(12) as pool:
        streams = pool.map(ask, range(8))
        whole = pool.map(ask_whole, range(4))
        assert list(streams) == [(ANSWER, "stop")] * 8
        assert list(whole) == [ANSWER] * 4


def test_content_parts_are_read_as_text(server: Server):
    client = openai_client(server)
    parts = [{"type": "text", "text": QUESTION}]
    answer = client.chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=32)
    assert answer.choices[0].message.content == ANSWER
    status, body = server.chat(messages=[{"role": "user", "content": [
        *parts, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    assert status == 400
    assert json.loads(body)["error"]["param"] == "messages[0].content[1].type"


def test_json_schema_response_format_gives_json_that_matches(server: Server):
    client = openai_client(server)
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Berlin"]},
        "sure": {"type": "boolean"}}, "required": ["city", "sure"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model=ALIAS, messages=QUESTION_MESSAGES, max_tokens=48, temperature=0.7, seed=3,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    data = json.loads(answer.choices[0].message.content)
    assert set(data) == {"city", "sure"} and data["city"] in ("Paris", "Rome", "Berlin")
    assert isinstance(data["sure"], bool)
    anything = client.chat.completions.create(
        model=ALIAS, messages=QUESTION_MESSAGES, max_tokens=48, temperature=0,
        response_format={"type": "json_object"})
    assert isinstance(json.loads(anything.choices[0].message.content), (dict, list))


def test_n_choices_and_usage_of_a_stream(server: Server):
    client = openai_client(server)
    answer = client.chat.completions.create(model=ALIAS, messages=QUESTION_MESSAGES, n=2,
                                            temperature=0, max_tokens=32)
    assert [(c.index, c.message.content) for c in answer.choices] == [(0, ANSWER), (1, ANSWER)]
    one = client.chat.completions.create(model=ALIAS, messages=QUESTION_MESSAGES,
                                         temperature=0, max_tokens=32).usage
    assert answer.usage.completion_tokens == 2 * one.completion_tokens
    chunks = list(client.chat.completions.create(
        model=ALIAS, messages=QUESTION_MESSAGES, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        one.prompt_tokens, one.completion_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_and_max_tokens(server: Server):
    client = openai_client(server)
    cut = client.chat.completions.create(model=ALIAS, messages=QUESTION_MESSAGES, temperature=0,
                                         max_tokens=2)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2
    stopped = client.chat.completions.create(model=ALIAS, messages=QUESTION_MESSAGES,
                                             temperature=0, max_tokens=32, stop=[" capital"])
    assert stopped.choices[0].message.content == ANSWER.split(" capital")[0]
    whole = client.chat.completions.create(model=ALIAS, messages=QUESTION_MESSAGES,
                                           temperature=0, max_tokens=-1)
    assert whole.choices[0].message.content == ANSWER


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_prompt_longer_than_the_context_is_a_400(server: Server, stream: bool):
    status, body = server.chat(messages=[{"role": "user", "content": "Hello there " * 200}],
                               max_tokens=8, stream=stream)
    assert status == 400, body
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and "context" in error["message"]
    assert server.chat(messages=QUESTION_MESSAGES, temperature=0, max_tokens=32)[0] == 200


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/nowhere", 404), ("GET", "/v1/chat/completions", 405)])
def test_unknown_paths_and_methods_get_openai_errors(server: Server, method, path, status):
    request = urllib.request.Request(f"{server.url}{path}", method=method)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == status
    error = json.loads(caught.value.read())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_sigterm_lets_the_stream_in_flight_finish():
    """A stream running when SIGTERM arrives completes; new connections are refused; the
    server then exits 0. The real SmolLM2 file: its answers take long enough to be caught."""
    from chatbot_trainer.model import packaged_models

    model = packaged_models.find("smollm")
    if model is None:
        pytest.skip("needs the SmolLM2 GGUF (scripts/bootstrap.sh)")
    running = Server(model)
    try:
        running.wait_ready()
        client = openai_client(running)
        stream = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Write a long story about a cat."}],
            max_tokens=120, temperature=0.7, seed=1, stream=True,
            stream_options={"include_usage": True}, timeout=120)
        chunks = iter(stream)
        first = next(chunks)
        running.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert call(f"{running.url}/health", timeout=5)[0] == 0  # no new connections
        rest = list(chunks)
        finish = [c.choices[0].finish_reason for c in [first, *rest] if c.choices]
        assert finish[-1] in ("length", "stop")
        assert rest[-1].usage is not None and rest[-1].usage.completion_tokens > 20
        assert running.process.wait(timeout=60) == 0
    finally:
        running.stop()


def test_health_then_sigterm_stops_cleanly(gguf: Path):
    running = Server(gguf)
    try:
        running.wait_ready()
        assert set(running.health) <= {0, 503, 200}  # 503 while loading, then 200
        assert running.health[-1] == 200
    finally:
        code = running.stop()
    assert code == 0, running.process.stdout.read()


def test_missing_file_is_a_clear_error(tmp_path: Path):
    proc = subprocess.run(cli("serve", str(tmp_path / "none.gguf")), env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "none.gguf is not a file" in proc.stderr


# ---------------------------------------------------------------------------- chat


def read_until(fd: int, marker: str, seen: list[str], timeout: float = 120) -> str:
    """Read the terminal until `marker` has appeared once more; return the new text."""
    start = len("".join(seen))
    deadline = time.monotonic() + timeout
    while marker not in "".join(seen)[start:]:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} within {timeout} s: {''.join(seen)[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen.append(os.read(fd, 4096).decode(errors="replace"))
            except OSError:  # the child closed the terminal
                break
    return "".join(seen)[start:]


def test_chat_in_a_terminal_streams_keeps_the_conversation_and_quits(gguf: Path):
    controller, terminal = pty.openpty()
    process = subprocess.Popen(cli("chat", str(gguf), "--temperature", "0", "--ctx", "256",
                                   "--threads", "1"),
                               env=env(), stdin=terminal, stdout=terminal, stderr=terminal,
                               close_fds=True)
    os.close(terminal)
    seen: list[str] = []
    try:
        read_until(controller, "you> ", seen)
        os.write(controller, f"{QUESTION}\n".encode())
        first = read_until(controller, "you> ", seen)
        assert f"bot> {ANSWER}" in first
        # A second turn: the first question and answer stay in the prompt.
        os.write(controller, f"{QUESTION}\n".encode())
        second = read_until(controller, "you> ", seen)
        assert "bot> " in second
        os.write(controller, b"/exit\n")
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)


def test_chat_quits_on_ctrl_d(gguf: Path):
    controller, terminal = pty.openpty()
    process = subprocess.Popen(cli("chat", str(gguf), "--ctx", "256", "--threads", "1"),
                               env=env(), stdin=terminal, stdout=terminal, stderr=terminal,
                               close_fds=True)
    os.close(terminal)
    try:
        read_until(controller, "you> ", [])
        os.write(controller, b"\x04")  # Ctrl-D at the start of a line: end of input
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
