"""Trainer tests: one thread (two OpenMP threads on two busy cores thrash) and no hub access.

The test command sets the same variables; this keeps a direct `pytest tests/trainer` run alike.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

# Tests share helpers by importing sibling test modules (pytest runs with --import-mode=importlib,
# which does not put this directory on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent))


import json  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SUPPORT_DATA = ROOT / "examples" / "data" / "support.jsonl"
# A few steps of short sequences on SmolLM2: the point is the path, not the learning.
REAL_RUN = ["--model_type", "smollm", "--training_steps", "3", "--batch_size", "2", "--learning_rate", "0.0003",
            "--set", "maxSeqLength=128", "--set", "evaluation.maxEvalExamples=6",
            "--set", "evaluation.sampleAnswers=2", "--set", "export.quantizations=[f16,q4_k_m]"]


@pytest.fixture(scope="session")
def real_smollm_run(tmp_path_factory):
    """The whole pipeline on SmolLM2-135M-Instruct (its offline GGUF copy) and the support data:
    F16 and q4_k_m files named bot.*.gguf. Shared by the llama-cpp-python and llama-server tests."""
    from chatbot_trainer import cli
    from chatbot_trainer.model import packaged_models

    assert packaged_models.find("smollm"), f"run: {packaged_models.fetch_hint('smollm')} (the test command does)"
    out = tmp_path_factory.mktemp("real")
    args = ["run", "-q", "--training_data", str(SUPPORT_DATA), "--name", "bot", "-o", str(out), *REAL_RUN]
    assert cli.training_main(args) == 0
    return out


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """llama.cpp's own llama-server, built from the sources the pinned llama-cpp-python vendors
    (scripts/llama-server.sh: compiled once, ~15 min on 2 cores, then cached)."""
    done = subprocess.run([str(ROOT / "scripts" / "llama-server.sh")], capture_output=True, text=True,
                          timeout=3600)
    assert done.returncode == 0, f"scripts/llama-server.sh failed:\n{done.stderr[-3000:]}"
    return Path(done.stdout.strip().splitlines()[-1])
