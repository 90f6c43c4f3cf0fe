"""Command lines.

`chatbot-training run`: the whole pipeline locally, with the seed workflow's inputs as flags
(`--training_data` or `--training-data`), printing the seed's output JSON.
`chatbot-training serve MODEL.gguf` / `chat MODEL.gguf`: an OpenAI-compatible server, a
terminal chat on an exported file (serve/).

`chatbot-trainer <step>`: one step, as a Kubernetes Job runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from chatbot_api.spec import STEPS
from chatbot_trainer.errors import StepError
from chatbot_trainer.train.hardware import apply_cpu_threads
from chatbot_trainer.params import (
    SEED_INPUTS,
    read_config_file,
    set_nested,
    split_name,
    trainer_params,
)

SEED_FLAGS: dict[str, dict[str, Any]] = {
    "training_data": {"help": "chat data: JSONL/JSON file, pvc://, https:// or s3:// (required)"},
    "model_type": {"help": "base model: preset (gpt, llama, qwen2, mistral, smollm, scratch-gpt, "
                   "scratch-llama), hub id or local directory (default: gpt)"},
    "training_steps": {"type": int, "help": "optimizer steps (default: 1000; or use --epochs)"},
    "batch_size": {"type": int, "help": "conversations per step (default: 8)"},
    "learning_rate": {"type": float, "help": "peak learning rate (default: the base model's, e.g. "
                      "0.0003 for models up to 1B parameters; see README)"},
}


def _fail(exc: StepError) -> int:
    print(f"error: {exc.message}", file=sys.stderr)
    return exc.exit_code


def build_run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatbot-training",
        description="Fine-tune a chatbot with LoRA and export it as GGUF, locally.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run prepare → configure → train → evaluate → export")
    run.add_argument("-f", "--file", help="YAML/JSON settings: the seed's `inputs:` block, a "
                     "ChatbotTraining manifest or a plain mapping; flags override it")
    for name, kwargs in SEED_FLAGS.items():
        run.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, **kwargs)
    run.add_argument("--epochs", type=float, help="passes over the training data instead of "
                     "--training_steps (resolved to steps from the packed data; may be fractional)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="any other setting, e.g. --set lora.rank=8 --set maxSeqLength=256")
    run.add_argument("--name", help="run name, used for file names (default: from -f or 'chatbot')")
    run.add_argument("-o", "--output", default="output", help="output directory (default: ./output)")
    run.add_argument("--workspace", help="step workspace (default: OUTPUT/workspace)")
    run.add_argument("--resume", action="store_true",
                     help="reuse finished steps and the latest checkpoint of an earlier run")
    run.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", type=int, default=1,
                     metavar="N", help="train on N processes with torchrun (gloo on a CPU, NCCL on "
                     "GPUs); the other steps run in this process (default: 1)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")
    from chatbot_trainer.serve import chat, server

    server.add_parser(sub)
    chat.add_parser(sub)
    return parser


def training_main(argv: list[str] | None = None) -> int:
    args = build_run_parser().parse_args(argv)
    if getattr(args, "handler", None):  # serve, chat
        return args.handler(args)
    apply_cpu_threads()  # in a container with a CPU limit: that many threads
    try:
        data: dict[str, Any] = read_config_file(args.file) if args.file else {}
        file_name, data = split_name(data)
        for name in SEED_INPUTS:
            value = getattr(args, name)
            if value is not None:
                data[name] = value
        if args.epochs is not None and args.training_steps is not None:
            raise StepError("--epochs and --training_steps are mutually exclusive: give one", exit_code=2)
        if args.epochs is not None:  # a flag overrides the file: its trainingSteps goes
            data = {k: v for k, v in data.items() if k not in ("trainingSteps", "training_steps")}
            data["epochs"] = args.epochs
        elif args.training_steps is not None:
            data.pop("epochs", None)
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise StepError(f"--set {item!r}: use KEY=VALUE", exit_code=2)
            set_nested(data, key, value)
        if "training_data" not in data and "trainingData" not in data:
            raise StepError("--training_data is required (a JSONL/JSON chat file)", exit_code=2)
        params = trainer_params(data)
        name = _safe_name(args.name or file_name or "chatbot")
        from chatbot_trainer.pipeline import run_pipeline

        log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr))
        output, details = run_pipeline(
            params, name=name, output_dir=Path(args.output),
            workspace=Path(args.workspace) if args.workspace else None, resume=args.resume,
            show_progress=not args.quiet and sys.stderr.isatty(), log=log,
            nproc_per_node=args.nproc_per_node,
        )
    except StepError as exc:
        return _fail(exc)
    if not args.quiet:
        from chatbot_trainer.pipeline import summary_text

        print(summary_text(details), file=sys.stderr)
        print(f"details: {Path(args.output) / 'details.json'}", file=sys.stderr)
    else:  # warnings reach stderr even when quiet
        for warning in output.get("warnings") or []:
            print(f"WARNING: {warning}", file=sys.stderr)
    print(json.dumps(output, indent=2))
    return 0


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "chatbot"


def build_step_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatbot-trainer", description="Run one ChatbotTraining step.")
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--workspace", required=True, help="shared workspace directory")
    parser.add_argument("--config", required=True, help="TrainingParams as JSON or YAML")
    parser.add_argument("--output", help="export: directory for the GGUF files (default: WORKSPACE/export)")
    parser.add_argument("--termination-log", help="where to write the termination message "
                        "(default: $CHATBOT_TERMINATION_LOG or /dev/termination-log)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    return parser


class _ProgressHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def log_progress_to_stderr() -> None:
    """The steps' progress lines (start, base model, resume point, one per logged training
    window, end) on stderr, one line each, whether or not it is a terminal: what `kubectl
    logs` of a step pod shows. Other libraries keep their own levels (warnings)."""
    logger = logging.getLogger("chatbot_trainer")
    if any(isinstance(h, _ProgressHandler) for h in logger.handlers):
        return
    handler = _ProgressHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                           "%Y-%m-%dT%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def trainer_main(argv: list[str] | None = None) -> int:
    args = build_step_parser().parse_args(argv)
    log_progress_to_stderr()
    apply_cpu_threads()  # before torch starts its thread pools: the pod's CPU limit, not the node's cores
    from chatbot_trainer.steps import run_step
    from chatbot_trainer.workspace import StepContext, write_termination_message

    try:
        name, data = split_name(read_config_file(args.config))
        params = trainer_params(data)
    except StepError as exc:
        write_termination_message(args.termination_log, {"step": args.step, "ok": False,
                                                         "reason": exc.reason, "message": exc.message})
        return _fail(exc)
    ctx = StepContext(
        workspace=Path(args.workspace), params=params, name=_safe_name(name or "chatbot"),
        output_dir=Path(args.output) if args.output else None, show_progress=args.progress,
    )
    try:
        result = run_step(args.step, ctx, termination_log=args.termination_log)
    except StepError as exc:
        return _fail(exc)
    print(json.dumps({"step": args.step, "ok": True, "summary": result.get("summary", {})}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(trainer_main())
