"""`chatbot-training chat MODEL.gguf`: talk to an exported model in the terminal.

The prompt is rendered with the chat template embedded in the file (the one the model was
fine-tuned with) by llama-cpp-python, the answer streams token by token and ends at the
model's end-of-turn token, and the conversation is kept: each answer sees the turns before it
(the oldest turns are dropped when they no longer fit the context). `/reset` starts over;
`/exit`, Ctrl-D or Ctrl-C quit; Ctrl-C during an answer stops that answer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

PROMPT = "you> "
ANSWER = "bot> "


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("chat", help="chat with a GGUF file in the terminal",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the GGUF file, e.g. output/demo/support-bot.q8_0.gguf")
    parser.add_argument("--ctx", type=int, default=4096, help="context size in tokens (default: 4096)")
    parser.add_argument("--system", help="system prompt (default: the template's own, if any)")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest answer (default: 512)")
    parser.add_argument("--temperature", type=float, default=0.2, help="sampling temperature "
                        "(default: 0.2; 0 answers greedily)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: llama.cpp's choice)")
    parser.set_defaults(handler=main)


def _load(args: argparse.Namespace) -> Any:
    import llama_cpp

    kwargs: dict[str, Any] = {"model_path": str(args.model), "n_ctx": args.ctx, "verbose": False}
    if args.threads:
        kwargs.update(n_threads=args.threads, n_threads_batch=args.threads)
    return llama_cpp.Llama(**kwargs)


def stream_answer(llm: Any, messages: list[dict[str, str]], args: argparse.Namespace) -> str:
    """Print the answer as it is generated; return it. Drops the oldest turns while the
    conversation does not fit the context."""
    while True:
        try:
            chunks = llm.create_chat_completion(messages, stream=True, max_tokens=args.max_tokens,
                                                temperature=args.temperature)
            reply = []
            for chunk in chunks:
                text = chunk["choices"][0]["delta"].get("content") or ""
                if text:
                    print(text, end="", flush=True)
                    reply.append(text)
            return "".join(reply)
        except ValueError as exc:  # the prompt exceeds the context window
            first = 1 if messages and messages[0]["role"] == "system" else 0
            if len(messages) - first <= 1:
                print(f"[{exc}]", end="")
                return ""
            del messages[first:first + 2]


def main(args: argparse.Namespace) -> int:
    if not Path(args.model).is_file():
        print(f"error: {args.model} is not a file (a GGUF model)", file=sys.stderr)
        return 2
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    try:
        llm = _load(args)
    except ImportError:
        print("error: chat needs llama-cpp-python (scripts/bootstrap.sh --llama)", file=sys.stderr)
        return 2
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(f"Chatting with {Path(args.model).name}; /reset starts over, /exit or Ctrl-D quits.",
          flush=True)
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(start)
            print("(conversation cleared)")
            continue
        messages.append({"role": "user", "content": text})
        print(ANSWER, end="", flush=True)
        try:
            reply = stream_answer(llm, messages, args)
        except KeyboardInterrupt:
            reply = ""
            print(" [stopped]", end="")
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})
