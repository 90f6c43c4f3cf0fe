"""`epochs` and the default learning rate, resolved by the configure step and used by train."""

from __future__ import annotations

import json
import math
import random

import pytest

from chatbot_api.spec import TrainingParams
from chatbot_trainer.data.packing import build_sequences
from chatbot_trainer.data.tokenization import tokenize_dataset
from chatbot_trainer.model.loading import load_tokenizer_with_template
from chatbot_trainer.steps import run_step
from chatbot_trainer.train.defaults import resolve_learning_rate, resolve_training_steps
from chatbot_trainer.workspace import StepContext


def write_data(path, n: int = 48) -> None:
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    rows = []
    for i in range(n):
        picked = " ".join(rng.sample(words, rng.randint(1, 5)))
        rows.append({"messages": [{"role": "user", "content": f"say {picked} {i}"},
                                  {"role": "assistant", "content": f"{picked} {i}"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def context(tmp_path, **settings) -> StepContext:
    data = tmp_path / "data.jsonl"
    write_data(data)
    params = TrainingParams(training_data=str(data), model_type="tiny-llama", batch_size=4, micro_batch_size=4,
                            max_seq_length=64, log_every=1, checkpoint_every=1000, seed=0,
                            data={"eval_fraction": 0.0}, **settings)
    return StepContext(workspace=tmp_path / "ws", params=params)


def test_epochs_resolve_over_the_packed_sequences_and_train_uses_them(tmp_path):
    ctx = context(tmp_path, epochs=1.5)
    run_step("prepare", ctx)
    configure = run_step("configure", ctx)
    tokenizer, _ = load_tokenizer_with_template(configure["base_model_path"])
    conversations = [json.loads(line) for line in (ctx.workspace / "prepare" / "train.jsonl").read_text().splitlines()]
    examples, _ = tokenize_dataset(tokenizer, conversations, 64)
    sequences = len(build_sequences(examples, 64, True))
    assert sequences < len(conversations)  # packed: several conversations per sequence
    assert configure["train_sequences"] == sequences
    assert configure["training_steps"] == math.ceil(1.5 * sequences / 4)
    assert configure["summary"]["training_steps"] == configure["training_steps"]
    assert "epochs 1.5" in configure["training_steps_reason"]
    assert configure["warmup_steps"] == math.ceil(0.03 * configure["training_steps"])
    # A model built from a config trains all its weights: its own default learning rate.
    assert (configure["learning_rate"], configure["learning_rate_reason"]) == (
        1e-3, "default for a model built from a config (all weights train)")
    trained = run_step("train", ctx)
    assert trained["steps"] == trained["steps_this_run"] == configure["training_steps"]
    assert trained["summary"]["learning_rate"] == 1e-3
    records = [json.loads(line) for line in (ctx.workspace / "train" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["lr"] for r in records) <= 1e-3 and records[-1]["epoch"] == pytest.approx(1.5, abs=0.2)


def test_unpacked_epochs_count_one_sequence_per_conversation(tmp_path):
    ctx = context(tmp_path, epochs=2, packing=False)
    run_step("prepare", ctx)
    configure = run_step("configure", ctx)
    assert configure["train_sequences"] == 48 and configure["training_steps"] == 24


def test_learning_rate_set_wins_else_the_base_size_decides():
    smollm = {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "vocab_size": 49152}
    seven_b = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "vocab_size": 32768}
    seventy_b = {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "vocab_size": 128256}
    unset = TrainingParams(training_data="x")
    assert resolve_learning_rate(unset, smollm, scratch=False)[0] == 3e-4
    assert "about 148M parameters (up to 1B parameters)" in resolve_learning_rate(unset, smollm, scratch=False)[1]
    assert resolve_learning_rate(unset, seven_b, scratch=False)[0] == 2e-4
    assert resolve_learning_rate(unset, seventy_b, scratch=False)[0] == 1e-4
    chosen = TrainingParams(training_data="x", learning_rate=5e-5)
    assert resolve_learning_rate(chosen, smollm, scratch=True) == (5e-5, "learningRate as set")


def test_training_steps_without_epochs():
    def never():
        raise AssertionError("sequences are counted only for epochs")

    assert resolve_training_steps(TrainingParams(training_data="x"), never) == {
        "training_steps": 1000, "training_steps_reason": "default (neither trainingSteps nor epochs set)"}
    assert resolve_training_steps(TrainingParams(training_data="x", training_steps=7), never)["training_steps"] == 7
    resolved = resolve_training_steps(TrainingParams(training_data="x", epochs=0.01, batch_size=8), lambda: 10)
    assert resolved["training_steps"] == 1  # at least one step
