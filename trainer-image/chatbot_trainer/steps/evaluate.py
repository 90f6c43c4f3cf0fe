"""Step 4, evaluate: loss, token accuracy and perplexity on the held-out conversations, and the
answers themselves: fact recall and ROUGE-L against the data's answers (evaluate/answers.py).

The fine-tuned model and the base model (before fine-tuning) are evaluated on the same
tokenized examples and answer the same held-out questions (``evaluation.answerQuestions``,
greedy), so the result shows before → after; ``evaluation.sampleAnswers`` of those answers are
kept side by side with the data's own. ``evaluate/metrics.json`` is written before the quality
thresholds (``evaluation.maxLoss``, ``minAccuracy``, ``minFactRecall``, ``minAnswerScore``) are
checked, so a failed run still shows what it reached, with the facts each answer missed. A
fine-tuned eval loss that is not below the base model's, or answers with a lower fact recall or
ROUGE-L than the base's, is a warning in the result (and the operator's status), and fails the
step with ``evaluation.requireImprovement``. With an empty eval split (tiny data sets, or
``data.evalFraction: 0``) a deterministic sample of the training split is used and the result
says so (``"eval_split": "train-sample"``). While it runs, the batches done are served as live
progress (train/progress_server.py); the results also go to TensorBoard beside the training's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from chatbot_trainer.errors import InvalidConfig, InvalidData, QualityThresholdNotMet
from chatbot_trainer.evaluate.samples import MAX_NEW_TOKENS
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


def check_thresholds(metrics: dict[str, Any], evaluation) -> list[str]:
    """One message per threshold the metrics miss (empty when all pass)."""
    problems = []
    if evaluation.max_loss is not None and metrics["loss"] > evaluation.max_loss:
        problems.append(
            f"eval loss {metrics['loss']:.4g} is above evaluation.maxLoss {evaluation.max_loss:g}: "
            "train longer (trainingSteps or epochs), raise learningRate or check the data"
        )
    if evaluation.min_accuracy is not None and metrics["accuracy"] < evaluation.min_accuracy:
        problems.append(
            f"eval token accuracy {metrics['accuracy']:.4g} is below evaluation.minAccuracy "
            f"{evaluation.min_accuracy:g}: train longer (trainingSteps or epochs), raise learningRate or "
            "check the data"
        )
    for key, threshold, name, what in (
        ("fact_recall", evaluation.min_fact_recall, "minFactRecall", "fact recall"),
        ("rouge_l", evaluation.min_answer_score, "minAnswerScore", "answer ROUGE-L"),
    ):
        if threshold is None:
            continue
        value = metrics.get(key)
        if value is None:
            reason = ("no held-out answer has a checkable fact" if key == "fact_recall" and
                      evaluation.answer_questions else "no held-out question was answered "
                      "(evaluation.answerQuestions is 0 or no held-out conversation ends in an answer)")
            problems.append(f"evaluation.{name} is set but {reason}")
        elif value < threshold:
            problems.append(
                f"{what} {value:.4g} on the held-out questions is below evaluation.{name} {threshold:g}: "
                "train longer (epochs), raise learningRate or lora.rank, or check the data "
                "(details: evaluate/metrics.json, answers.per_question)"
            )
    return problems


def _eval_examples(ctx: StepContext, tokenizer) -> tuple[list[dict[str, Any]], list, dict[str, Any], str]:
    """The held-out conversations and their tokenized examples; a sample of the training split
    when no held-out conversation fits maxSeqLength (the tokenization says so)."""
    from chatbot_trainer.data.tokenization import tokenize_dataset

    max_len = ctx.params.max_seq_length
    conversations, split = _eval_conversations(ctx)
    examples, tokenization = tokenize_dataset(tokenizer, conversations, max_len)
    if not examples and split == "eval":
        note = f"no eval conversation fits maxSeqLength {max_len}"
        train_sample, split = _train_sample(ctx)
        examples, tokenization = tokenize_dataset(tokenizer, train_sample, max_len)
        tokenization["note"] = note
    if not examples:
        raise InvalidData(
            f"no conversation to evaluate fits maxSeqLength {max_len} with assistant tokens "
            f"({tokenization}): raise maxSeqLength or check the data"
        )
    return conversations, examples, tokenization, split


def _measure(model, tokenizer, examples: list, settings: dict[str, Any], questions: list,
             board: ProgressBoard, label: str, first: bool) -> tuple[dict[str, Any], list[str], float]:
    """One model's eval metrics (the first or second half of the board's batches) and its answers
    to `questions`, with the seconds the answers took."""
    from chatbot_trainer.evaluate.metrics import evaluate_model
    from chatbot_trainer.evaluate.samples import generate_answers

    metrics = evaluate_model(model, examples, **settings, on_batch=lambda done, total: board.update(
        done if first else total + done, 2 * total))
    board.pause(f"sample answers of the {label} model")
    started = time.perf_counter()
    answers = generate_answers(model, tokenizer, questions)
    return metrics, answers, time.perf_counter() - started


def run(ctx: StepContext) -> dict[str, Any]:
    import torch

    from chatbot_trainer.evaluate.answers import answer_report, answers_warning, held_out_questions
    from chatbot_trainer.evaluate.samples import sample_questions, side_by_side
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
    conversations, examples, tokenization, split = _eval_examples(ctx, tokenizer)

    settings = dict(
        micro_batch_size=micro,
        max_seq_length=params.max_seq_length,
        packing=params.packing,
        device=device,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Scored questions: the first answerQuestions held-out questions; the samples shown are a
    # deterministic choice of them (answered alone when answerQuestions is 0).
    all_questions = held_out_questions(conversations)
    scored = all_questions[:params.evaluation.answer_questions]
    questions = sample_questions(scored or all_questions, params.evaluation.sample_answers, params.seed)
    to_answer = scored or questions
    board = ProgressBoard("evaluate", "batches")  # fine-tuned model's batches, then the base's
    timings: dict[str, float] = {}
    try:
        with serving(board):
            metrics, fine_tuned_answers, timings["fine_tuned"] = _measure(
                model, tokenizer, examples, settings, to_answer, board, "fine-tuned", first=True)
            del model
            board.pause("loading the base model")
            base_model = load_base_model(trained, device=device, dtype=dtype)
            base_metrics, base_answers, timings["base"] = _measure(
                base_model, tokenizer, examples, settings, to_answer, board, "base", first=False)
            del base_model
    except ValueError as exc:  # e.g. a model that cannot keep packed examples apart
        raise InvalidConfig(str(exc)) from exc

    position = {id(q): i for i, q in enumerate(to_answer)}
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
            "min_fact_recall": params.evaluation.min_fact_recall,
            "min_answer_score": params.evaluation.min_answer_score,
            "require_improvement": params.evaluation.require_improvement,
        },
        "samples": side_by_side(questions, base=[base_answers[position[id(q)]] for q in questions],
                                fine_tuned=[fine_tuned_answers[position[id(q)]] for q in questions]),
        "sample_questions": questions,
        "samples_generated_with": "transformers (merged model and base model, greedy)",
    }
    warnings = []
    not_improved = improvement_warning(report["metrics"], report["base_metrics"])
    if not_improved:
        warnings.append(not_improved)
    if scored:
        answers = answer_report(scored, base=base_answers, fine_tuned=fine_tuned_answers)
        answers["seconds"] = {k: round(v, 2) for k, v in timings.items()}
        answers["generated_with"] = "transformers (merged model and base model, greedy, " \
            f"at most {MAX_NEW_TOKENS} new tokens)"
        answers["held_out_questions"] = len(all_questions)
        report["answers"] = answers
        for key, which in (("metrics", "fine_tuned"), ("base_metrics", "base")):
            report[key].update(fact_recall=answers[which]["fact_recall"], rouge_l=answers[which]["rouge_l"])
        worse = answers_warning(answers)
        if worse:
            warnings.append(worse)
        _mark_misses(report["samples"], questions, scored, answers)
    report["warnings"] = warnings
    problems = check_thresholds(report["metrics"], params.evaluation)
    if warnings and params.evaluation.require_improvement:
        problems += [f"{warning} (evaluation.requireImprovement is set)" for warning in warnings]
    report["passed"] = not problems
    if problems:
        report["failures"] = problems
    write_json_atomic(out / "metrics.json", report)
    record_evaluation(ctx.workspace, configure.get("training_steps") or params.training_steps or 0,
                      report["metrics"], report["base_metrics"])
    if problems:
        raise QualityThresholdNotMet("; ".join(problems))
    summary = {"metrics": report["metrics"], "base_metrics": report["base_metrics"]}
    if "answers" in report:
        summary["answers"] = {k: report["answers"]["fine_tuned"][k] for k in ("questions", "facts")}
    if report["warnings"]:
        summary["warnings"] = report["warnings"]
    return {**report, "metrics_path": str(out / "metrics.json"), "summary": summary}


def _mark_misses(samples: list[dict[str, Any]], questions, scored, answers: dict[str, Any]) -> None:
    """The facts each sample answer missed, beside the answer."""
    where = {id(q): i for i, q in enumerate(scored)}
    for row, question in zip(samples, questions):
        scored_row = answers["per_question"][where[id(question)]]
        row["fine_tuned_missed"] = scored_row["fine_tuned_missed"]
        row["base_missed"] = scored_row["base_missed"]


def improvement_warning(metrics: dict[str, float], base_metrics: dict[str, float]) -> str | None:
    """A sentence when fine-tuning did not lower the eval loss below the base model's."""
    if metrics["loss"] < base_metrics["loss"]:
        return None
    return (
        f"the fine-tuned model is not better than the base model: eval loss {metrics['loss']:.4g} vs "
        f"{base_metrics['loss']:.4g} before fine-tuning (accuracy {metrics['accuracy']:.3g} vs "
        f"{base_metrics['accuracy']:.3g}); lower learningRate, check the data, or train longer"
    )

