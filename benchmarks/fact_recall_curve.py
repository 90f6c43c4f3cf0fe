"""Fact recall over epochs: README's "A chatbot that knows its data" recipe at several epochs.

Each point is a whole `chatbot-training run` of the recipe (SmolLM2-135M-Instruct, the
`smollm` preset; LoRA rank 32 / alpha 64 on all attention and MLP projections; learning
rate 1e-3; 4 packed 256-token sequences a step) with `--epochs E`, in a child process as a
user runs it, on examples/data/support.jsonl; the evaluate step answers every held-out question
with the base and the fine-tuned model. Per point: the resolved steps, the wall time of the
whole run and of each step, the training tokens/s, eval loss, fact recall and ROUGE-L, base and
fine-tuned. Reported (printed, written to results/fact_recall_curve.json), not asserted.

    .venv/bin/python benchmarks/fact_recall_curve.py --epochs 0.5 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RECIPE = ["--training_data", str(REPO / "examples" / "data" / "support.jsonl"), "--model_type", "smollm",
          "--batch_size", "4", "--learning_rate", "0.001", "--set", "maxSeqLength=256",
          "--set", "lora.rank=32", "--set", "lora.alpha=64", "--name", "support-bot"]


def run_point(epochs: float, out: Path) -> dict:
    command = [str(REPO / ".venv" / "bin" / "chatbot-training"), "run", "-q", *RECIPE,
               "--epochs", str(epochs), "--output", str(out)]
    start = time.monotonic()
    done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"epochs {epochs}: exit {done.returncode}\n{done.stderr[-3000:]}")
    details = json.loads((out / "details.json").read_text())
    trained = json.loads((out / "workspace" / "train" / "result.json").read_text())
    answers = details["answers"]
    return {
        "epochs": epochs, "steps": trained["steps"], "wall_s": round(wall, 1),
        "steps_s": details["timings_seconds"], "tokens_per_second": trained["tokens_per_second"],
        "eval_loss": {"base": details["base_metrics"]["loss"], "fine_tuned": details["metrics"]["loss"]},
        "fact_recall": {k: answers[k]["fact_recall"] for k in ("base", "fine_tuned")},
        "facts": {k: [answers[k]["facts_stated"], answers[k]["facts"]] for k in ("base", "fine_tuned")},
        "rouge_l": {k: answers[k]["rouge_l"] for k in ("base", "fine_tuned")},
        "questions": answers["fine_tuned"]["questions"], "answer_seconds": answers["seconds"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, nargs="+", default=[0.5, 1, 2])
    parser.add_argument("--workdir", type=Path, default=REPO / "output" / "fact-recall-curve")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "fact_recall_curve.json")
    args = parser.parse_args()
    points = []
    for epochs in args.epochs:
        point = run_point(epochs, args.workdir / f"epochs-{epochs:g}")
        points.append(point)
        print(f"{epochs:g} epochs ({point['steps']} steps): {point['wall_s'] / 60:.1f} min, fact recall "
              f"{point['fact_recall']['base']:.1%} -> {point['fact_recall']['fine_tuned']:.1%}, ROUGE-L "
              f"{point['rouge_l']['base']:.3f} -> {point['rouge_l']['fine_tuned']:.3f}, eval loss "
              f"{point['eval_loss']['fine_tuned']:.3f}, {point['tokens_per_second']} tokens/s", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"benchmark": "fact_recall_curve", "cpus": os.cpu_count(),
                                       "date": time.strftime("%Y-%m-%d"), "points": points}, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
