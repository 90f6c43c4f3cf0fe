"""bf16 autocast vs fp32 on the real model: same data, same steps, do the losses agree?

`precision: auto` picks bf16 autocast (fp32 master weights and optimizer) on CPUs with native
bf16 (avx512_bf16 / AMX). This trains SmolLM2-135M-Instruct (its offline GGUF copy, real
weights) twice on the bundled example data, once per precision, each in a fresh process, and
compares the logged train loss of every window and the evaluate step's metrics of the two
adapters (evaluation runs in fp32 on a CPU, so only the training precision differs). It also
reports each run's tokens/s: on a CPU without native bf16 (AVX2 only), bf16 is emulated and
slower, which is why `auto` keeps fp32 there.

    .venv/bin/python benchmarks/bf16_agreement.py [--steps 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "support.jsonl"
# Stated tolerances: bf16 keeps 8 bits of mantissa (relative rounding ~4e-3 per operation).
TRAIN_LOSS_TOLERANCE = 0.05  # absolute, per logged window
EVAL_LOSS_TOLERANCE = 0.02  # relative
ACCURACY_TOLERANCE = 0.02  # absolute


def run_precision(workspace: str, config: dict[str, Any], threads: int) -> dict[str, Any]:
    common.set_quiet_env(threads)
    import torch

    torch.set_num_threads(threads)
    from chatbot_trainer.params import trainer_params
    from chatbot_trainer.steps import run_step
    from chatbot_trainer.workspace import StepContext

    ctx = StepContext(workspace=Path(workspace), params=trainer_params(config), name="bf16-check")
    for step in ("prepare", "configure", "train", "evaluate"):
        result = run_step(step, ctx, termination_log=os.devnull)
    trained = ctx.read_result("train")
    records = [json.loads(line) for line in Path(trained["metrics_path"]).read_text().splitlines()]
    return {"precision": trained["precision"], "tokens_per_s": trained["tokens_per_second"],
            "losses": [(r["step"], r["loss"]) for r in records], "metrics": result["metrics"],
            "base_metrics": result.get("base_metrics")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))
    parser.add_argument("--quick", action="store_true", help="4 steps: checks that everything runs")
    args = parser.parse_args()
    steps = 4 if args.quick else args.steps
    common.set_quiet_env(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-bf16-"))
    config = {"trainingData": str(DATA), "modelType": "smollm", "trainingSteps": steps, "batchSize": 4,
              "learningRate": 3e-4, "maxSeqLength": 128, "logEvery": 2, "checkpointEvery": 10**6,
              "seed": 42, "evaluation": {"maxEvalExamples": 32, "sampleAnswers": 0}}
    runs = {}
    for precision in ("fp32", "bf16"):
        result, peak = common.run_isolated(run_precision, str(work / precision), {**config, "precision": precision},
                                           args.threads)
        runs[precision] = {**result, "peak_rss": peak}
        print(f"{precision}: {result['tokens_per_s']} tokens/s, eval {result['metrics']}", flush=True)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    train_diffs = [abs(a[1] - b[1]) for a, b in zip(fp32["losses"], bf16["losses"])]
    eval_rel = abs(bf16["metrics"]["loss"] - fp32["metrics"]["loss"]) / fp32["metrics"]["loss"]
    accuracy_diff = abs(bf16["metrics"]["accuracy"] - fp32["metrics"]["accuracy"])
    rows = [[f"step {a[0]}", a[1], b[1], abs(a[1] - b[1])] for a, b in zip(fp32["losses"], bf16["losses"])]
    rows += [["eval loss", fp32["metrics"]["loss"], bf16["metrics"]["loss"], eval_rel],
             ["eval accuracy", fp32["metrics"]["accuracy"], bf16["metrics"]["accuracy"], accuracy_diff],
             ["tokens/s", fp32["tokens_per_s"], bf16["tokens_per_s"], None]]
    print()
    print(common.table(["", "fp32", "bf16 autocast", "|difference|"], rows))
    agree = (max(train_diffs) <= TRAIN_LOSS_TOLERANCE and eval_rel <= EVAL_LOSS_TOLERANCE
             and accuracy_diff <= ACCURACY_TOLERANCE)
    print(f"\nmax train-loss difference {max(train_diffs):.4f} (tolerance {TRAIN_LOSS_TOLERANCE}); "
          f"eval loss {eval_rel:.2%} apart (tolerance {EVAL_LOSS_TOLERANCE:.0%}); accuracy {accuracy_diff:.4f} "
          f"apart (tolerance {ACCURACY_TOLERANCE}): {'agree' if agree else 'DO NOT AGREE'}")
    data = {"benchmark": "bf16_agreement", "machine": common.machine_info(),
            "versions": common.package_versions(["torch", "transformers", "peft"]),
            "settings": {**vars(args), "config": config},
            "tolerances": {"train_loss_abs": TRAIN_LOSS_TOLERANCE, "eval_loss_rel": EVAL_LOSS_TOLERANCE,
                           "accuracy_abs": ACCURACY_TOLERANCE},
            "max_train_loss_difference": max(train_diffs), "eval_loss_relative_difference": eval_rel,
            "accuracy_difference": accuracy_diff, "agree": agree, "runs": runs}
    common.finish("bf16_agreement", data, quick=args.quick, work=work, keep=False)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
