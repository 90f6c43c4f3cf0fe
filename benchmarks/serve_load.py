"""Local serving under load: N streaming clients at once against `chatbot-training serve`.

The server runs as a user starts it (`chatbot-training serve MODEL.gguf --port P`, a child
process on 127.0.0.1); the clients are the official `openai` package's AsyncOpenAI, each
asking one chat question with `stream=True` and `stream_options.include_usage`, all started
together. Per client: whether it completed (text, a finish_reason and usage, no error), the
time to its first content token (TTFT), and the tokens it got. Per round: completed / N,
TTFT p50 and p95, the generated tokens per second of the whole round (every client's
completion tokens over the round's wall time), and the wall time.

Rounds: `--clients 8 32` by default, each once per `--parallel` value and per `--server`:
`local` (`chatbot-training serve`, `--ctx` per slot) and `llama-server` (llama.cpp's own, the
build the cluster's image pins, from scripts/llama-server.sh, run with the arguments the
operator generates for `serve: {parallel: P, contextSize: ctx × P, resources: {limits: {cpu:
<cores>}}}`, host and port mapped to 127.0.0.1). Figures are reported (printed, and written
to results/serve_load.json), not asserted: they depend on the machine.

    .venv/bin/python benchmarks/serve_load.py --server local llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.",
    "How do I reset my password?", "Write one sentence about the sea.",
    "What is two plus two?", "Give me a tip for learning Python.",
    "Why is the sky blue?", "Suggest a name for a cat.",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_command(model: Path, port: int, parallel: int, queue: int, ctx: int) -> list[str]:
    return [sys.executable, "-c", "import sys; from chatbot_trainer.cli import training_main; "
            "sys.exit(training_main())", "serve", str(model), "--port", str(port),
            "--parallel", str(parallel), "--queue", str(queue), "--ctx", str(ctx)]


def llama_server_command(model: Path, port: int, parallel: int, queue: int, ctx: int) -> list[str]:
    """llama-server with the operator's arguments (its queue has no bound: `queue` is unused)."""
    sys.path[:0] = [str(REPO / "operator")]
    from chatbot_api.spec import ChatbotTrainingSpec
    from chatbot_operator import serving

    binary = subprocess.run([str(REPO / "scripts" / "llama-server.sh")], check=True, text=True,
                            stdout=subprocess.PIPE).stdout.split()[-1]
    spec = ChatbotTrainingSpec.model_validate({"trainingData": "/data/chat.jsonl", "serve": {
        "enabled": True, "parallel": parallel, "contextSize": ctx * parallel,
        "resources": {"limits": {"cpu": str(os.cpu_count())}}}})
    args = serving.server_args("bench", spec, str(model))
    for flag, value in {"--host": "127.0.0.1", "--port": str(port)}.items():
        args[args.index(flag) + 1] = value
    return [binary, *args]


def start_server(server: str, model: Path, port: int, parallel: int, queue: int, ctx: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "trainer-image"), str(REPO / "operator"), os.environ.get("PYTHONPATH", "")])}
    build = local_command if server == "local" else llama_server_command
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the server
    process = subprocess.Popen(build(model, port, parallel, queue, ctx), env=env, stdout=log,
                               stderr=subprocess.STDOUT, text=True)
    process.log = log  # type: ignore[attr-defined]
    return process


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 180) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            process.log.seek(0)
            raise RuntimeError(f"the server exited: {process.log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready after {timeout} s")


async def one_client(client: Any, index: int, max_tokens: int, timeout: float) -> dict[str, Any]:
    start = time.monotonic()
    first: float | None = None
    text, finish, usage, error = [], None, None, None
    try:
        stream = await client.chat.completions.create(
            model="bot", messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
            max_tokens=max_tokens, temperature=0.7, seed=index, stream=True,
            stream_options={"include_usage": True}, timeout=timeout)
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    if first is None:
                        first = time.monotonic() - start
                    text.append(choice.delta.content)
                finish = choice.finish_reason or finish
    except Exception as exc:  # noqa: BLE001 - counted as not completed
        error = f"{type(exc).__name__}: {exc}"
    completed = error is None and bool(text) and finish is not None and usage is not None
    return {"completed": completed, "ttft_s": first, "tokens": usage or 0, "finish": finish,
            "chars": len("".join(text)), "error": error, "seconds": time.monotonic() - start}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def round_of(url: str, clients: int, max_tokens: int, timeout: float) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    start = time.monotonic()
    results = await asyncio.gather(*(one_client(client, i, max_tokens, timeout)
                                     for i in range(clients)))
    wall = time.monotonic() - start
    await client.close()
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "completed": sum(r["completed"] for r in results),
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p95_s": percentile(ttfts, 0.95), "tokens": tokens,
            "tokens_per_s": tokens / wall if wall else None, "wall_s": wall,
            "errors": sorted({r["error"] for r in results if r["error"]}), "each": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/chatbot-training/"
                        "models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--server", nargs="+", choices=["local", "llama-server"], default=["local"])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=300, help="per client request (s)")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--quick", action="store_true",
                        help="2 clients, one slot, 8 tokens: checks that it runs")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.parallel, args.max_tokens = [2], [1], 8
    args.output = args.output or BENCH_DIR / "results" / (
        "serve_load.quick.json" if args.quick else "serve_load.json")
    rounds = []
    for server, parallel in [(server, parallel) for server in args.server for parallel in args.parallel]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        process = start_server(server, args.model, port, parallel, max(args.clients), args.ctx)
        try:
            ready = wait_ready(url, process)
            asyncio.run(round_of(url, 1, 8, args.timeout))  # warm-up: pages of the file in memory
            for clients in args.clients:
                result = asyncio.run(round_of(url, clients, args.max_tokens, args.timeout))
                result.update(server=server, parallel=parallel, ready_s=ready)
                rounds.append(result)
                print(f"{server}, parallel {parallel}, {clients} clients: {result['completed']}/{clients} "
                      f"completed, TTFT p50 {result['ttft_p50_s']:.2f} s, p95 "
                      f"{result['ttft_p95_s']:.2f} s, {result['tokens_per_s']:.1f} tokens/s in "
                      f"total ({result['tokens']} tokens in {result['wall_s']:.1f} s)"
                      + (f"; errors: {result['errors']}" if result["errors"] else ""), flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "benchmark": "serve_load", "model": args.model.name, "max_tokens": args.max_tokens,
        "ctx": args.ctx, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        "rounds": rounds}, indent=1))
    print(f"wrote {args.output}")
    return 0 if all(r["completed"] == r["clients"] for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
