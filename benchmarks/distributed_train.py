"""One vs several training processes (torchrun): tokens/s and how closely they agree.

The same LoRA fine-tune (tiny Llama built from a config, LoRA r=8 without dropout, fp32,
global batch 8 × 64 tokens, micro-batch 4) runs through `python -m chatbot_trainer.launch` on
1 process, on N with DDP and on N with FSDP2; reported: tokens/s from the train result, the
largest difference of the logged losses and of the final adapter weights against 1 process.

    PYTHONPATH=operator:trainer-image OMP_NUM_THREADS=1 python benchmarks/distributed_train.py \\
        --steps 200 --nproc 2 [--out DIR]

On a CPU the ranks use gloo; on a GPU machine with N GPUs, NCCL (the tiny model measures the
overhead, not scaling).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "trainer"))

from test_training import make_workspace, weights  # noqa: E402  (the tests' tiny workspaces)


def run(base: Path, tag: str, nproc: int, strategy: str, steps: int) -> tuple[dict, list, dict]:
    root = base / tag
    ctx = make_workspace(root, "tiny-llama", configure_overrides={"train_base_weights": False},
                         training_steps=steps, batch_size=8, micro_batch_size=4, log_every=1,
                         checkpoint_every=10 * steps, precision="fp32",
                         lora={"rank": 8, "dropout": 0.0}, distributed={"strategy": strategy})
    config = root / "config.json"
    config.write_text(json.dumps(ctx.params.to_api()))
    subprocess.run([sys.executable, "-m", "chatbot_trainer.launch", "--standalone",
                    f"--nproc-per-node={nproc}", "-m", "chatbot_trainer.cli", "train",
                    "--workspace", str(root), "--config", str(config),
                    "--termination-log", str(root / "termination-log")],
                   check=True, capture_output=True)
    result = json.loads((root / "train" / "result.json").read_text())
    losses = [json.loads(line)["loss"] for line in (root / "train" / "metrics.jsonl").read_text().splitlines()]
    return result, losses, weights(root / "train" / "adapter" / "adapter_model.safetensors")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", help="where to keep the workspaces (default: a temporary directory)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = Path(args.out or tempfile.mkdtemp(prefix="distributed-train-"))
    runs = {tag: run(base, tag, n, strategy, args.steps)
            for tag, n, strategy in (("1", 1, "ddp"), (f"{args.nproc}-ddp", args.nproc, "ddp"),
                                     (f"{args.nproc}-fsdp", args.nproc, "fsdp"))}
    _, ref_losses, ref_adapter = runs["1"]
    rows = []
    for tag, (result, losses, adapter) in runs.items():
        rows.append({
            "processes": tag, "tokens_per_second": result["tokens_per_second"],
            "train_tokens": result["train_tokens"], "first_losses": losses[:3],
            "max_abs_loss_difference": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "max_abs_adapter_difference": max(float((adapter[k] - ref_adapter[k]).abs().max())
                                              for k in ref_adapter),
        })
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
