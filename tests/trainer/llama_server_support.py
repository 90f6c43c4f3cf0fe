"""Running llama.cpp's own llama-server (scripts/llama-server.sh builds it) with the arguments of
the Deployment the operator generates, and talking to it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from chatbot_api.spec import ChatbotTrainingSpec
from chatbot_operator import serving, settings

NAME = "support-bot"
TRAINING = {"apiVersion": "chatbot.dev/v1alpha1", "kind": "ChatbotTraining",
            "metadata": {"name": NAME, "namespace": "ml", "uid": "1234-abcd"}}
SERVE = {"enabled": True, "parallel": 2, "contextSize": 2048, "quantization": "f16",
         "resources": {"limits": {"cpu": "1"}}}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def operator_args(gguf: Path, port: int, **serve) -> tuple[list[str], dict[str, str]]:
    """The server container's args and plain env from the operator's Deployment, with the model
    path, host and port mapped to this machine."""
    spec = ChatbotTrainingSpec.model_validate({"trainingData": "/data/chat.jsonl", "serve": {**SERVE, **serve}})
    file = {"path": f"pvc://{NAME}-workspace/export/{gguf.name}", "quantization": "f16"}
    body = serving.deployment(TRAINING, spec, settings.OperatorConfig(), file)
    (container,) = body["spec"]["template"]["spec"]["containers"]
    args = list(container["args"])
    mapped = {"-m": str(gguf), "--host": "127.0.0.1", "--port": str(port)}
    for flag, value in mapped.items():
        args[args.index(flag) + 1] = value
    assert f"{serving.MODEL_DIR}/export/{gguf.name}" not in args
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return args, env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, body: bytes | dict | None = None, method: str | None = None,
            headers: dict | None = None) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@contextlib.contextmanager
def running(binary: Path, args: list[str], env: dict[str, str], log: Path):
    """`binary args…` (llama-server, or `chatbot-training serve`) until its /health answers 200;
    its URL while the block runs; SIGTERM after."""
    port = args[args.index("--port") + 1]
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(binary), *args], stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            assert process.poll() is None, f"llama-server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"llama-server not ready: {log.read_text()[-2000:]}"
            time.sleep(0.3)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _ready(url: str) -> bool:
    """/health answers 200 once the model is loaded (503 while loading)."""
    try:
        return request(f"{url}/health")[0] == 200
    except OSError:  # not listening yet
        return False


def chat(url: str, body: dict, **headers) -> tuple[int, dict]:
    status, raw = request(f"{url}/v1/chat/completions", {"temperature": 0, "max_tokens": 48, **body},
                          headers=headers)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"raw": raw.decode(errors="replace")}
