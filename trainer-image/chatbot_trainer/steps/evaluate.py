"""Step 4, evaluate: loss, token accuracy and perplexity on the held-out conversations.

The fine-tuned model and the base model (before fine-tuning) are evaluated on the same
tokenized examples, so the result shows before → after. ``evaluate/metrics.json`` is written
before the quality thresholds (``evaluation.maxLoss``, ``evaluation.minAccuracy``) are checked,
so a failed run still shows what it reached. A fine-tuned eval loss that is not below the base
model's is a warning in the result (and the operator's status), and fails the step with
``evaluation.requireImprovement``. A few held-out questions (``evaluation.sampleAnswers``) are
answered greedily by both models and kept side by side with the data's own answers. With an empty eval split (tiny data sets, or
``data.evalFraction: 0``) a deterministic sample of the training split is used and the result
says so (``"eval_split": "train-sample"``). While it runs, the batches done are served as live
progress (train/progress_server.py); the results also go to TensorBoard beside the training's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from chatbot_trainer.errors import InvalidConfig, InvalidData, QualityThresholdNotMet
from chatbot_trainer.train import hardware
from chatbot_trainer.train.monitor import record_evaluation
from chatbot_trainer.train.progress_server import ProgressBoard, serving
from chatbot_trainer.workspace import StepContext, write_json_atomic

TRAIN_SAMPLE_SIZE = 256  # conversations evaluated when there is no eval split


def _load(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    from chatbot_trainer.data.dataset import load_jsonl

    return load_jsonl(path)


def _eval_conversations(ctx: StepContext) -> tuple[list[dict[str, Any]], str]:
    limit = ctx.params.evaluation.max_eval_examples
    conversations = _load(ctx.workspace / "prepare" / "eval.jsonl")
    if conversations:
        return conversations[:limit] if limit else conversations, "eval"
    sample, split = _train_sample(ctx)
    if not sample:
        raise InvalidData("prepare/eval.jsonl and prepare/train.jsonl are empty: run the prepare step first")
    return sample, split


def _train_sample(ctx: StepContext) -> tuple[list[dict[str, Any]], str]:
    """A deterministic sample of the training split, for when there is no eval split."""
    train = _load(ctx.workspace / "prepare" / "train.jsonl")
    size = min(len(train), ctx.params.evaluation.max_eval_examples or TRAIN_SAMPLE_SIZE)
    if size == 0:
        return [], "train-sample"
    chosen = np.sort(np.random.default_rng(ctx.params.seed).choice(len(train), size=size, replace=False))
    return [train[int(i)] for i in chosen], "train-sample"


def _rounded(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(metrics[k]), 6) for k in ("loss", "accuracy", "perplexity")}


def check_thresholds(metrics: dict[str, float], evaluation) -> list[str]:
    """One message per threshold the metrics miss (empty when all pass)."""
    problems = []
    if evaluation.max_loss is not None and metrics["loss"] > evaluation.max_loss:
        problems.append(
            f"eval loss {metrics['loss']:.4g} is above evaluation.maxLoss {evaluation.max_loss:g}: "
            "train longer (trainingSteps), raise learningRate or check the data"
        )
    if evaluation.min_accuracy is not None and metrics["accuracy"] < evaluation.min_accuracy:
        problems.append(
            f"eval token accuracy {metrics['accuracy']:.4g} is below evaluation.minAccuracy "
            f"{evaluation.min_accuracy:g}: train longer (trainingSteps), raise learningRate or check the data"
        )
    return problems


def run(ctx: StepContext) -> dict[str, Any]:
    import torch

    from chatbot_trainer.data.tokenization import tokenize_dataset
    from chatbot_trainer.evaluate.metrics import evaluate_model
    from chatbot_trainer.evaluate.samples import (
        generate_answers,
        sample_questions,
        side_by_side,
    )
    from chatbot_trainer.model.loading import load_base_model, load_trained_model

    params = ctx.params
    out = ctx.step_dir("evaluate")
    if not ctx.show_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    configure = ctx.read_result("configure")
    trained = ctx.read_result("train")
    # this node's GPU (or CPU and memory), not the one configure ran on
    node = hardware.resolve(ctx.params, model_config=hardware.model_config_of(trained.get("base_model_path_for_adapter")))
    device = node["device"]
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(node["precision"])
    dtype = half if device == "cuda" else None
    micro = node["micro_batch_size"]

    model, tokenizer = load_trained_model(trained, merge=True, device=device, dtype=dtype)
    conversations, split = _eval_conversations(ctx)
    examples, tokenization = tokenize_dataset(tokenizer, conversations, params.max_seq_length)
    if not examples and split == "eval":
        note = f"no eval conversation fits maxSeqLength {params.max_seq_length}"
        train_sample, split = _train_sample(ctx)
        examples, tokenization = tokenize_dataset(tokenizer, train_sample, params.max_seq_length)
        tokenization["note"] = note
    if not examples:
        raise InvalidData(
            f"no conversation to evaluate fits maxSeqLength {params.max_seq_length} with assistant tokens "
            f"({tokenization}): raise maxSeqLength or check the data"
        )

    settings = dict(
        micro_batch_size=micro,
        max_seq_length=params.max_seq_length,
        packing=params.packing,
        device=device,
        pad_token_id=tokenizer.pad_token_id,
    )
    questions = sample_questions(conversations, params.evaluation.sample_answers, params.seed)
    board = ProgressBoard("evaluate", "batches")  # fine-tuned model's batches, then the base's
    try:
        with serving(board):
            metrics = evaluate_model(model, examples, **settings,
                                     on_batch=lambda done, total: board.update(done, 2 * total))
            board.pause("sample answers of the fine-tuned model")
            fine_tuned_answers = generate_answers(model, tokenizer, questions)
            del model
            board.pause("loading the base model")
            base_model = load_base_model(trained, device=device, dtype=dtype)
            base_metrics = evaluate_model(base_model, examples, **settings,
                                          on_batch=lambda done, total: board.update(total + done, 2 * total))
            board.pause("sample answers of the base model")
            base_answers = generate_answers(base_model, tokenizer, questions)
            del base_model
    except ValueError as exc:  # e.g. a model that cannot keep packed examples apart
        raise InvalidConfig(str(exc)) from exc

    report = {
        "metrics": _rounded(metrics),
        "base_metrics": _rounded(base_metrics),
        "eval_split": split,
        "eval_examples": len(examples),
        "eval_tokens": metrics["tokens"],
        "tokenization": tokenization,
        "thresholds": {
            "max_loss": params.evaluation.max_loss,
            "min_accuracy": params.evaluation.min_accuracy,
            "require_improvement": params.evaluation.require_improvement,
        },
        "samples": side_by_side(questions, base=base_answers, fine_tuned=fine_tuned_answers),
        "sample_questions": questions,
        "samples_generated_with": "transformers (merged model and base model, greedy)",
    }
    not_improved = improvement_warning(report["metrics"], report["base_metrics"])
    report["warnings"] = [not_improved] if not_improved else []
    problems = check_thresholds(metrics, params.evaluation)
    if not_improved and params.evaluation.require_improvement:
        problems.append(f"{not_improved} (evaluation.requireImprovement is set)")
    report["passed"] = not problems
    write_json_atomic(out / "metrics.json", report)
    record_evaluation(ctx.workspace, params.training_steps, report["metrics"], report["base_metrics"])
    if problems:
        raise QualityThresholdNotMet("; ".join(problems))
    summary = {"metrics": report["metrics"], "base_metrics": report["base_metrics"]}
    if report["warnings"]:
        summary["warnings"] = report["warnings"]
    return {**report, "metrics_path": str(out / "metrics.json"), "summary": summary}


def improvement_warning(metrics: dict[str, float], base_metrics: dict[str, float]) -> str | None:
    """A sentence when fine-tuning did not lower the eval loss below the base model's."""
    if metrics["loss"] < base_metrics["loss"]:
        return None
    return (
        f"the fine-tuned model is not better than the base model: eval loss {metrics['loss']:.4g} vs "
        f"{base_metrics['loss']:.4g} before fine-tuning (accuracy {metrics['accuracy']:.3g} vs "
        f"{base_metrics['accuracy']:.3g}); lower learningRate, check the data, or train longer"
    )

