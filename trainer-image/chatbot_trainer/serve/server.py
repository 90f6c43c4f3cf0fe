"""`chatbot-training serve MODEL.gguf`: an OpenAI-compatible server on an exported GGUF file.

The model runs in llama-cpp-python (the GGUF runtime the trainer builds and tests against),
under the project's own small ASGI app (app.py) on uvicorn, so that it holds up with several
clients: in the cluster the operator runs llama.cpp's own C++ server instead (spec.serve),
and this one answers the same requests the same way where it can (README, "Serve the model",
lists where they differ):
- `--parallel` slots run requests at once (default 1: llama-cpp-python runs one completion
  at a time per model instance; each slot loads its own instance on the memory-mapped file
  and gets `--threads` CPU threads, by default the CPUs it may use but one shared among the
  slots);
  up to `--queue` more wait for a slot, one beyond that gets a 503 in OpenAI's shape
  (slots.py); a stream is never interrupted by another request;
- `/health`: 503 `{"status": "loading model"}` while the file loads, 200 `{"status": "ok"}`
  once it answers (the server listens at once; the model loads in a thread);
- a request it cannot take gets a 400 in OpenAI's shape, `{"error": {"message", "type":
  "invalid_request_error", "param", "code"}}` (protocol.py), an unknown path a 404 and a
  wrong method a 405 in the same shape;
- `/v1/models` lists the model under its alias (default: the file name without the
  quantization and `.gguf`), the name clients pass as `model`;
- SIGTERM or SIGINT drains it: it stops accepting connections, lets the requests it has
  (running and queued) finish for up to `--grace` seconds, then exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

DEFAULT_PORT = 8080
DEFAULT_CONTEXT = 4096
DEFAULT_QUEUE = 64
# Kubernetes' default terminationGracePeriodSeconds is 30: finish within it.
DEFAULT_GRACE = 25.0
QUANT_SUFFIX = re.compile(r"[.-](f32|f16|bf16|q\d(_[a-z0-9]+)*)$", re.IGNORECASE)


def default_alias(path: Path) -> str:
    """support-bot.q8_0.gguf → support-bot."""
    return QUANT_SUFFIX.sub("", path.name.removesuffix(".gguf")) or path.name


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("serve", help="serve a GGUF file with an OpenAI-compatible API",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the GGUF file, e.g. output/demo/support-bot.q8_0.gguf")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: "
                        "127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--ctx", type=_positive, default=DEFAULT_CONTEXT,
                        help=f"context size of each slot in tokens (default: {DEFAULT_CONTEXT})")
    parser.add_argument("--alias", help="model name in /v1/models (default: from the file name)")
    parser.add_argument("--parallel", "-np", type=_positive, default=1,
                        help="requests generated at once, one model instance each (default: 1)")
    parser.add_argument("--queue", type=int, default=DEFAULT_QUEUE,
                        help="requests that may wait for a slot; one more gets a 503 "
                        f"(default: {DEFAULT_QUEUE})")
    parser.add_argument("--threads", "-t", type=_positive,
                        help="CPU threads of each slot (default: the CPUs this process may use, "
                        "its cgroup's CPU limit included, less one, divided by --parallel; "
                        "at least 1)")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                        help="on SIGTERM/SIGINT, seconds to let running and queued requests "
                        f"finish before exiting (default: {DEFAULT_GRACE:g})")
    parser.add_argument("--api-key", default=os.environ.get("LLAMA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $LLAMA_API_KEY)")
    parser.set_defaults(handler=main)


def build_model(model: Path, ctx: int, threads: int) -> Any:
    """One model instance (loads the file; the weights are memory-mapped, so instances of the
    same file share them)."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(model), n_ctx=ctx, n_threads=threads,
                           n_threads_batch=threads, verbose=False)


# ----------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    from chatbot_trainer.serve.app import ModelServer
    from chatbot_trainer.serve.slots import available_cpus, threads_per_slot

    model = Path(args.model)
    if not model.is_file():
        print(f"error: {model} is not a file (a GGUF model, e.g. output/demo/support-bot.q8_0.gguf)",
              file=sys.stderr)
        return 2
    try:
        import llama_cpp  # noqa: F401
        import uvicorn
    except ImportError as exc:
        print(f"error: serving needs llama-cpp-python and uvicorn ({exc.name} is missing): "
              "pip install 'chatbot-training[serve]' and llama-cpp-python "
              "(scripts/bootstrap.sh --llama)", file=sys.stderr)
        return 2
    alias = args.alias or default_alias(model)
    threads = args.threads or threads_per_slot(available_cpus(), args.parallel)
    app = ModelServer(alias, parallel=args.parallel, max_queue=max(0, args.queue),
                      api_key=args.api_key)
    loader = threading.Thread(target=app.load, daemon=True, name="load-model", args=(
        lambda: build_model(model, args.ctx, threads),))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=max(0.0, args.grace))
    server = DrainingServer(config, app, args.grace)
    loader.start()
    print(f"Serving {model} as {alias!r} on http://{args.host}:{args.port}/v1 "
          f"({args.parallel} slot(s) of {args.ctx} tokens, {threads} thread(s) each, "
          f"up to {args.queue} queued; health: /health; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    # uvicorn drains on SIGINT/SIGTERM, then raises the signal again for the handler it found:
    # a no-op here, so the exit status is 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    app.executor.shutdown(wait=False, cancel_futures=True)
    return 0 if app.failure is None else 1


def _server_class() -> type:
    import uvicorn

    class Draining(uvicorn.Server):
        """uvicorn's server, saying what it does on the first stop signal: it closes its
        sockets, then waits up to timeout_graceful_shutdown for the open requests."""

        def __init__(self, config: Any, app: Any, grace: float) -> None:
            super().__init__(config)
            self.app, self.grace = app, grace

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                slots = self.app.slots
                busy = f"{slots.running} running, {slots.waiting} queued" if slots else "loading"
                print(f"Stopping: no new connections; finishing the requests in flight "
                      f"({busy}) for up to {self.grace:g} s", file=sys.stderr, flush=True)
            super().handle_exit(sig, frame)

    return Draining


def DrainingServer(config: Any, app: Any, grace: float) -> Any:  # noqa: N802 - a class maker
    return _server_class()(config, app, grace)
