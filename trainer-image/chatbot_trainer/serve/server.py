"""`chatbot-training serve MODEL.gguf`: an OpenAI-compatible server on an exported GGUF file.

It is llama-cpp-python's server (the `serve` extra: FastAPI, uvicorn, sse-starlette):
llama-cpp-python is already the GGUF runtime the trainer builds and tests against, and its
server speaks the OpenAI API (`/v1/chat/completions` with streaming, `/v1/completions`,
`/v1/models`) with the chat template embedded in the file. In the cluster the operator runs
llama.cpp's own C++ server instead (spec.serve); both answer the same requests, and this one
keeps its contract where it matters to clients and probes:
- `/health`: 503 `{"status": "loading model"}` while the file loads, 200 `{"status": "ok"}`
  once it answers (the server listens at once; the model loads in a thread);
- a request the API cannot take (not JSON, missing or mistyped fields, no messages,
  max_tokens < 1) gets a 400 JSON error in OpenAI's shape,
  `{"error": {"message", "type": "invalid_request_error", "param", "code"}}` (checked before
  llama-cpp-python's app sees it: that app answers such requests with a 500);
- `/v1/models` lists the model under its alias (default: the file name without the
  quantization and `.gguf`), the name clients pass as `model`;
- SIGTERM or SIGINT stops it cleanly (exit status 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

DEFAULT_PORT = 8080
DEFAULT_CONTEXT = 4096
QUANT_SUFFIX = re.compile(r"[.-](f32|f16|bf16|q\d(_[a-z0-9]+)*)$", re.IGNORECASE)


def default_alias(path: Path) -> str:
    """support-bot.q8_0.gguf → support-bot."""
    return QUANT_SUFFIX.sub("", path.name.removesuffix(".gguf")) or path.name


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("serve", help="serve a GGUF file with an OpenAI-compatible API",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the GGUF file, e.g. output/demo/support-bot.q8_0.gguf")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: "
                        "127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--ctx", type=int, default=DEFAULT_CONTEXT,
                        help=f"context size in tokens (default: {DEFAULT_CONTEXT})")
    parser.add_argument("--alias", help="model name in /v1/models (default: from the file name)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: llama.cpp's choice)")
    parser.add_argument("--api-key", default=os.environ.get("LLAMA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $LLAMA_API_KEY)")
    parser.set_defaults(handler=main)


# ----------------------------------------------------------------------------- ASGI parts


async def _send_json(send: Callable, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def invalid_request(message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": None}}


def request_models() -> dict[str, Any]:
    """The request bodies llama-cpp-python's server takes, by path."""
    from llama_cpp.server import types

    return {"/v1/chat/completions": types.CreateChatCompletionRequest,
            "/v1/completions": types.CreateCompletionRequest,
            "/v1/embeddings": types.CreateEmbeddingRequest}


def check_request(path: str, body: bytes, models: dict[str, Any]) -> dict[str, Any] | None:
    """An OpenAI-shaped error for a body the endpoint cannot take, else None."""
    import pydantic

    try:
        data = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return invalid_request("The request body is not valid JSON")
    if not isinstance(data, dict):
        return invalid_request("The request body must be a JSON object")
    try:
        request = models[path].model_validate(data)
    except pydantic.ValidationError as exc:
        message, param = _validation_message(list(exc.errors()))
        return invalid_request(message, param)
    if path == "/v1/chat/completions" and not request.messages:
        return invalid_request("messages: at least one message is required", "messages")
    max_tokens = getattr(request, "max_tokens", None)
    if max_tokens is not None and max_tokens < 1:
        return invalid_request("max_tokens must be at least 1", "max_tokens")
    return None


async def _read_body(receive: Callable) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


class ModelServer:
    """The ASGI app: /health and a 503 while the model loads, then llama-cpp-python's app,
    behind a check that answers a request it cannot take with a 400 JSON error (it would
    answer such a request with a 500)."""

    def __init__(self) -> None:
        self.app: Any = None
        self.failure: str | None = None
        self.requests: dict[str, Any] = {}

    def load(self, build: Callable[[], Any]) -> None:
        try:
            self.requests = request_models()
            self.app = build()
        except Exception as exc:  # noqa: BLE001 - reported by /health and on stderr
            self.failure = f"{type(exc).__name__}: {exc}"
            print(f"error: cannot load the model: {self.failure}", file=sys.stderr, flush=True)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            if self.app is not None:
                return await _send_json(send, 200, {"status": "ok"})
            status = "loading model" if self.failure is None else f"failed: {self.failure}"
            return await _send_json(send, 503, {"status": status})
        if self.app is None:
            return await _send_json(send, 503, {"error": {
                "message": "Loading model" if self.failure is None else self.failure,
                "type": "unavailable_error", "code": 503}})
        if scope.get("method") == "POST" and scope["path"] in self.requests:
            body = await _read_body(receive)
            error = check_request(scope["path"], body, self.requests)
            if error is not None:
                return await _send_json(send, 400, error)
            receive = _replay(body, receive)
        await self.app(scope, receive, send)


def _replay(body: bytes, receive: Callable) -> Callable:
    """A `receive` that gives the already read body first, then waits as the original."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON", None
    return (f"{param}: {message}" if param else message), param


def build_app(model: Path, alias: str, ctx: int, threads: int | None, api_key: str | None) -> Any:
    """llama-cpp-python's FastAPI app on one model (loads the file)."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    settings: dict[str, Any] = {"model": str(model), "model_alias": alias, "n_ctx": ctx,
                                "verbose": False}
    if threads:
        settings.update(n_threads=threads, n_threads_batch=threads)
    return create_app(server_settings=ServerSettings(api_key=api_key),
                      model_settings=[ModelSettings(**settings)])


# ----------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    model = Path(args.model)
    if not model.is_file():
        print(f"error: {model} is not a file (a GGUF model, e.g. output/demo/support-bot.q8_0.gguf)",
              file=sys.stderr)
        return 2
    try:
        import llama_cpp.server.app  # noqa: F401
        import uvicorn
    except ImportError as exc:
        print(f"error: serving needs llama-cpp-python and its server extra ({exc.name} is "
              "missing): pip install 'chatbot-training[serve]' and llama-cpp-python "
              "(scripts/bootstrap.sh --llama)", file=sys.stderr)
        return 2
    alias = args.alias or default_alias(model)
    server_app = ModelServer()
    loader = threading.Thread(target=server_app.load, daemon=True, name="load-model", args=(
        lambda: build_app(model, alias, args.ctx, args.threads, args.api_key),))
    config = uvicorn.Config(server_app, host=args.host, port=args.port, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    loader.start()
    print(f"Serving {model} as {alias!r} on http://{args.host}:{args.port}/v1 "
          f"(health: /health; Ctrl-C stops)", file=sys.stderr, flush=True)
    # uvicorn stops on SIGINT/SIGTERM (it stops accepting, ends the open requests), then
    # raises the signal again for the handler it found: a no-op here, so the exit status is 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server_app.failure is None else 1
