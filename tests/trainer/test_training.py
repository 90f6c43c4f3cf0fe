"""The train step on tiny models: loss falls, checkpoints resume exactly, the model reloads."""

from __future__ import annotations

import gc
import json
import os
import random
from pathlib import Path

import pytest
import torch

from chatbot_api.spec import TrainingParams
from chatbot_trainer.model.base_models import materialize_base_model, resolve_base_model
from chatbot_trainer.workspace import StepContext


def counting_conversations(n: int, seed: int) -> list[dict]:
    """Regular data a tiny model learns in a few dozen steps: count on from a number."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randint(0, 20)
        out.append(
            {
                "messages": [
                    {"role": "user", "content": f"count from {start}"},
                    {"role": "assistant", "content": " ".join(str(start + i) for i in range(5))},
                ]
            }
        )
    return out


def make_workspace(
    root: Path, preset: str = "tiny-gpt", configure_overrides: dict | None = None, **params
) -> StepContext:
    """A workspace as prepare and configure leave it, with a tiny model built from a config."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "prepare").mkdir(exist_ok=True)
    train, held_out = counting_conversations(160, 1), counting_conversations(24, 2)
    for name, rows in (("train", train), ("eval", held_out)):
        (root / "prepare" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = dict(
        training_data="data.jsonl",
        model_type=preset,
        training_steps=30,
        batch_size=8,
        micro_batch_size=4,
        learning_rate=3e-3,
        max_seq_length=64,
        warmup_steps=2,
        log_every=5,
        checkpoint_every=10,
        seed=0,
    )
    settings.update(params)
    tp = TrainingParams(**settings)
    choice = resolve_base_model(preset)
    base_dir = root / "configure" / "base-model"
    if not base_dir.is_dir():
        materialize_base_model(choice, base_dir, train, 64, 0)
    ctx = StepContext(workspace=root, params=tp)
    configure = {
        "base_model": choice.to_dict(),
        "base_model_path": str(base_dir),
        "device": "cpu",
        "precision": "fp32",
        "micro_batch_size": tp.micro_batch_size or 4,  # as configure's node would choose, if not set
        "gradient_accumulation_steps": tp.batch_size // (tp.micro_batch_size or 4),
        "warmup_steps": tp.warmup_steps,
        "target_modules": None,
        "train_base_weights": True,
        "params": tp.to_api(),
    }
    configure.update(configure_overrides or {})
    ctx.write_result("configure", configure)
    return ctx


def read_metrics(ctx: StepContext) -> list[dict]:
    return [json.loads(line) for line in (ctx.workspace / "train" / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------- targets


def test_default_target_modules():
    from chatbot_trainer.model.base_models import (
        TINY_GPT,
        build_scratch_model,
        build_scratch_tokenizer,
    )
    from chatbot_trainer.model.loading import default_target_modules

    assert default_target_modules("gpt2") == ["c_attn", "c_proj", "c_fc"]
    for arch in ("llama", "mistral", "qwen2"):
        assert default_target_modules(arch) == [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        ]
    assert default_target_modules("some-new-arch") == ["all-linear"]
    tokenizer = build_scratch_tokenizer(["a b c"] * 4, vocab_size=280)
    model = build_scratch_model(TINY_GPT, tokenizer, max_positions=32)
    model.config.model_type = "renamed"  # unknown: every linear layer but the output layer
    assert default_target_modules(model) == ["c_attn", "c_fc", "c_proj"]


# ---------------------------------------------------------------------------- training


@pytest.mark.parametrize("preset", ["tiny-gpt", "tiny-llama"])
def test_loss_falls_and_the_step_reports_it(tmp_path, preset):
    from chatbot_trainer.train.recipe import train

    ctx = make_workspace(tmp_path, preset)
    result = train(ctx)
    assert result["completed"] and result["resumed_from"] is None
    assert result["initial_loss"] > 5.0
    assert result["final_loss"] < result["initial_loss"] - 2.0
    assert result["summary"] == {
        "train_loss": result["final_loss"],
        "initial_loss": result["initial_loss"],
        "steps": 30,
        "tokens_per_second": result["tokens_per_second"],
    }
    assert result["tokens_per_second"] > 0 and result["train_tokens"] > 0
    assert result["trainable_params"] == result["total_params"]  # scratch base: all weights train
    assert result["tokenization"]["kept"] == 160
    # layers this small keep PyTorch's products without timing the two libraries
    assert result["cpu_blas"]["backend"] == "torch" and "not worth timing" in result["cpu_blas"]["reason"]
    # packed rows of the segments attention go in as one row per micro-batch, without padding
    assert result["attention"] == "segments" and result["padding_free"] is True
    assert result["base_model_path_for_adapter"] == str(tmp_path / "train" / "base")
    assert (tmp_path / "train" / "adapter" / "adapter_config.json").is_file()
    metrics = read_metrics(ctx)
    assert [m["step"] for m in metrics] == [1, 5, 10, 15, 20, 25, 30]
    assert set(metrics[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_second", "epoch"}
    assert metrics[0]["loss"] == pytest.approx(result["initial_loss"], abs=1e-6)
    assert metrics[-1]["loss"] == pytest.approx(result["final_loss"])
    checkpoints = sorted(p.name for p in (tmp_path / "train" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-20", "checkpoint-30"]


def test_preempted_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    from chatbot_trainer.train.recipe import train

    full = make_workspace(tmp_path / "full")
    expected = train(full)

    ctx = make_workspace(tmp_path / "split")
    stopped = train(ctx, stop_at_step=14)  # the pod dies after step 14; checkpoint-10 survives
    assert stopped["completed"] is False
    assert gc.get_freeze_count() == 0  # the loop's frozen objects are collectable again
    assert [p.name for p in (tmp_path / "split" / "train" / "checkpoints").iterdir()] == ["checkpoint-10"]
    (tmp_path / "split" / "train" / "checkpoints" / ".tmp-checkpoint-20-999").mkdir()  # a half-written one
    resumed = train(ctx)
    assert resumed["resumed_from"].endswith("checkpoint-10")
    assert resumed["steps_this_run"] == 20
    assert resumed["final_loss"] == pytest.approx(expected["final_loss"], abs=1e-6)
    assert resumed["initial_loss"] == pytest.approx(expected["initial_loss"], abs=1e-9)
    assert resumed["train_tokens"] == expected["train_tokens"]
    for rel in ("adapter/adapter_model.safetensors", "base/model.safetensors"):
        a = weights(tmp_path / "full" / "train" / rel)
        b = weights(tmp_path / "split" / "train" / rel)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    steps = [m["step"] for m in read_metrics(ctx)]
    assert steps == [1, 5, 10, 15, 20, 25, 30]  # lines past the checkpoint were replaced

    # A finished run started again does no more steps and reports the same model.
    again = train(ctx)
    assert gc.get_freeze_count() == 0
    assert again["steps_this_run"] == 0 and again["resumed_from"].endswith("checkpoint-30")
    assert again["final_loss"] == pytest.approx(expected["final_loss"], abs=1e-6)


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path):
    from chatbot_trainer.train.recipe import train

    ctx = make_workspace(tmp_path, training_steps=10)
    train(ctx, stop_at_step=10)
    ctx = make_workspace(tmp_path, training_steps=10, learning_rate=1e-3)
    result = train(ctx)
    assert result["resumed_from"] is None


def test_trained_model_reloads_merged_and_unmerged(tmp_path):
    from chatbot_trainer.data.tokenization import tokenize_dataset
    from chatbot_trainer.evaluate.metrics import evaluate_model
    from chatbot_trainer.model.loading import load_base_model, load_trained_model
    from chatbot_trainer.steps import run_step

    os.environ["CHATBOT_TERMINATION_LOG"] = str(tmp_path / "termination-log")
    ctx = make_workspace(tmp_path / "ws", "tiny-llama", training_steps=12)
    result = run_step("train", ctx)
    assert json.loads((tmp_path / "ws" / "train" / "result.json").read_text())["final_loss"] == result["final_loss"]
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["ok"] and message["summary"]["train_loss"] == result["final_loss"]

    model, tokenizer = load_trained_model(ctx, merge=False)
    merged, _ = load_trained_model(tmp_path / "ws", merge=True)
    base = load_base_model(ctx)
    held_out = [json.loads(line) for line in (tmp_path / "ws" / "prepare" / "eval.jsonl").read_text().splitlines()]
    examples, _ = tokenize_dataset(tokenizer, held_out, 64)
    settings = dict(micro_batch_size=4, max_seq_length=64, packing=True)
    after = evaluate_model(model, examples, **settings)
    after_merged = evaluate_model(merged, examples, **settings)
    before = evaluate_model(base, examples, **settings)
    assert after["loss"] == pytest.approx(after_merged["loss"], abs=1e-4)
    assert after["loss"] < before["loss"] - 1.0


def test_new_chat_tokens_are_trained_with_a_frozen_base(tmp_path):
    """A base whose tokenizer has no chat template gets ChatML tokens; LoRA + those rows train."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from chatbot_trainer.model.base_models import (
        TINY_LLAMA,
        build_scratch_model,
        conversation_texts,
    )
    from chatbot_trainer.model.loading import load_trained_model
    from chatbot_trainer.train.recipe import train

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        list(conversation_texts(counting_conversations(50, 0))),
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", bos_token="</s>")
    base_dir = tmp_path / "plain-base"
    build_scratch_model(TINY_LLAMA, tokenizer, max_positions=64).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    ctx = make_workspace(
        tmp_path / "ws", "tiny-llama", training_steps=10,
        configure_overrides={"base_model_path": str(base_dir), "train_base_weights": False},
    )
    result = train(ctx)
    assert result["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert result["trainable_params"] < result["total_params"]
    assert result["base_model_path_for_adapter"] == str(tmp_path / "ws" / "train" / "base")
    model, loaded_tokenizer = load_trained_model(result, merge=True)
    assert len(loaded_tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert loaded_tokenizer.chat_template


# ---------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_with_a_named_reason_and_no_checkpoint(tmp_path, monkeypatch):
    """A learning rate of 0.5 once ran to the end (eval loss 11.1) and exited 0. Here the loss
    turns NaN at step 6, as an overflow would make it, before the step-10 checkpoint."""
    from chatbot_trainer.errors import TrainingDiverged
    from chatbot_trainer.train import recipe as training
    from chatbot_trainer.train.recipe import train

    real, calls = training.token_loss_sums, []

    def overflowing(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 10 else loss  # 2 micro-batches per step

    monkeypatch.setattr(training, "token_loss_sums", overflowing)
    ctx = make_workspace(tmp_path, "tiny-llama", learning_rate=1.0, log_every=5, checkpoint_every=10,
                         training_steps=40)
    with pytest.raises(TrainingDiverged, match="training diverged: the (loss|gradient norm) is (nan|inf)") as failed:
        train(ctx)
    assert "by step 10 (last finite loss" in failed.value.message
    assert "lower learningRate (now 1)" in failed.value.message and failed.value.exit_code == 3
    assert not (tmp_path / "train" / "checkpoints").exists()


def test_check_finite_names_the_last_good_loss():
    from chatbot_trainer.errors import TrainingDiverged
    from chatbot_trainer.train.monitor import check_finite

    params = TrainingParams(training_data="x", learning_rate=0.5)
    check_finite(3, 2.5, 1.0, [], params)
    with pytest.raises(TrainingDiverged, match=r"loss is nan by step 30 \(last finite loss 7.25 at step 20\)"):
        check_finite(30, float("nan"), 1.0, [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 7.25}], params)
    with pytest.raises(TrainingDiverged, match="gradient norm is inf"):
        check_finite(30, 2.0, float("inf"), [], params)
