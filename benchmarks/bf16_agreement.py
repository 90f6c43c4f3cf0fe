"""bf16 autocast vs fp32 on the real model: same data, same steps, do the losses agree?

`precision: auto` picks bf16 autocast (fp32 master weights and optimizer) on CPUs with native
bf16 (avx512_bf16 / AMX). This trains SmolLM2-135M-Instruct (its offline GGUF copy, real
weights) on the bundled example data three times, each in a fresh process, with the same data
order:

- fp32 and bf16 with the same seed (same LoRA initialization, same dropout masks);
- fp32 again with other random draws for the LoRA initialization and the dropout masks (the
  torch seed + 1): an equally valid fp32 run, whose distance from the first one is the noise
  any change of the run shows.

The stated tolerance: bf16's train-loss curve is no further from fp32's (root mean square
over the logged windows) than the second fp32 run's is, and the evaluate step's metrics of the
adapters (evaluation runs in fp32 on a CPU, so only the training precision differs) are within
2% (loss, relative) and 0.02 (token accuracy, absolute). It also reports each run's tokens/s:
on a CPU without native bf16 (AVX2 only), bf16 is emulated and slower, which is why `auto`
keeps fp32 there.

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
# Stated tolerances (the train curve's is the seed noise, measured in the same run).
EVAL_LOSS_TOLERANCE = 0.02  # relative
ACCURACY_TOLERANCE = 0.02  # absolute


def run_precision(workspace: str, config: dict[str, Any], threads: int, torch_seed_offset: int = 0) -> dict[str, Any]:
    common.set_quiet_env(threads)
    import torch

    torch.set_num_threads(threads)
    from chatbot_trainer.params import trainer_params
    from chatbot_trainer.steps import run_step
    from chatbot_trainer.train import recipe as training
    from chatbot_trainer.workspace import StepContext

    if torch_seed_offset:  # other LoRA initialization and dropout masks; the data order is params.seed's
        seed_everything = training.seed_everything
        training.seed_everything = lambda seed: seed_everything(seed + torch_seed_offset)
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
    arms = {"fp32": ("fp32", 0), "bf16": ("bf16", 0), "fp32_other_draws": ("fp32", 1)}
    for arm, (precision, offset) in arms.items():
        result, peak = common.run_isolated(run_precision, str(work / arm), {**config, "precision": precision},
                                           args.threads, offset)
        runs[arm] = {**result, "peak_rss": peak}
        print(f"{arm}: {result['tokens_per_s']} tokens/s, eval {result['metrics']}", flush=True)
    fp32, bf16, other = runs["fp32"], runs["bf16"], runs["fp32_other_draws"]

    def curve_distance(run: dict[str, Any]) -> tuple[float, float]:
        diffs = [abs(a[1] - b[1]) for a, b in zip(fp32["losses"], run["losses"])]
        return (sum(d * d for d in diffs) / len(diffs)) ** 0.5, max(diffs)

    (bf16_rms, bf16_max), (noise_rms, noise_max) = curve_distance(bf16), curve_distance(other)
    eval_rel = abs(bf16["metrics"]["loss"] - fp32["metrics"]["loss"]) / fp32["metrics"]["loss"]
    noise_eval_rel = abs(other["metrics"]["loss"] - fp32["metrics"]["loss"]) / fp32["metrics"]["loss"]
    accuracy_diff = abs(bf16["metrics"]["accuracy"] - fp32["metrics"]["accuracy"])
    rows = [[f"step {a[0]}", a[1], b[1], abs(a[1] - b[1]), c[1], abs(a[1] - c[1])]
            for a, b, c in zip(fp32["losses"], bf16["losses"], other["losses"])]
    rows += [["train loss, RMS difference", None, None, bf16_rms, None, noise_rms],
             ["eval loss", fp32["metrics"]["loss"], bf16["metrics"]["loss"], eval_rel,
              other["metrics"]["loss"], noise_eval_rel],
             ["eval accuracy", fp32["metrics"]["accuracy"], bf16["metrics"]["accuracy"], accuracy_diff,
              other["metrics"]["accuracy"], abs(other["metrics"]["accuracy"] - fp32["metrics"]["accuracy"])],
             ["tokens/s", fp32["tokens_per_s"], bf16["tokens_per_s"], None, other["tokens_per_s"], None]]
    print()
    print(common.table(["", "fp32", "bf16 autocast", "|bf16 - fp32|", "fp32, other draws",
                        "|other - fp32|"], rows))
    agree = bf16_rms <= noise_rms and eval_rel <= EVAL_LOSS_TOLERANCE and accuracy_diff <= ACCURACY_TOLERANCE
    print(f"\ntrain loss: bf16 {bf16_rms:.4f} RMS (max {bf16_max:.4f}) from fp32, another fp32 run "
          f"{noise_rms:.4f} (max {noise_max:.4f}); eval loss {eval_rel:.2%} apart (tolerance "
          f"{EVAL_LOSS_TOLERANCE:.0%}; another fp32 run {noise_eval_rel:.2%}); accuracy {accuracy_diff:.4f} apart "
          f"(tolerance {ACCURACY_TOLERANCE}): {'agree' if agree else 'DO NOT AGREE'}")
    data = {"benchmark": "bf16_agreement", "machine": common.machine_info(),
            "versions": common.package_versions(["torch", "transformers", "peft"]),
            "settings": {**vars(args), "config": config},
            "tolerances": {"train_loss_rms": "that of fp32 with other random draws",
                           "eval_loss_rel": EVAL_LOSS_TOLERANCE, "accuracy_abs": ACCURACY_TOLERANCE},
            "train_loss_rms_difference": bf16_rms, "train_loss_max_difference": bf16_max,
            "seed_noise_rms_difference": noise_rms, "seed_noise_max_difference": noise_max,
            "seed_noise_eval_loss_relative_difference": noise_eval_rel,
            "eval_loss_relative_difference": eval_rel,
            "accuracy_difference": accuracy_diff, "agree": agree, "runs": runs}
    common.finish("bf16_agreement", data, quick=args.quick, work=work, keep=False)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
