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
pytest.importorskip("fastapi", reason="needs the serve extra")
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
