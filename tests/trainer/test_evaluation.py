"""Evaluation: loss/accuracy on assistant tokens, packing-invariant, thresholds, the evaluate step."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from chatbot_api.spec import TrainingParams
from chatbot_trainer.data.tokenization import tokenize_dataset
from chatbot_trainer.errors import QualityThresholdNotMet
from chatbot_trainer.evaluate import metrics
from chatbot_trainer.evaluate.metrics import evaluate_model
from chatbot_trainer.model.base_models import (
    TINY_GPT,
    TINY_LLAMA,
    build_scratch_model,
    build_scratch_tokenizer,
    conversation_texts,
    materialize_base_model,
    resolve_base_model,
)
from chatbot_trainer.workspace import StepContext


def conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = "red green blue cyan magenta yellow black white".split()
    out = []
    for _ in range(n):
        picked = rng.sample(words, rng.randint(1, 6))
        turns = [
            {"role": "user", "content": "repeat " + " ".join(picked)},
            {"role": "assistant", "content": " ".join(picked)},
        ]
        if rng.random() < 0.4:
            turns += [{"role": "user", "content": "again"}, {"role": "assistant", "content": " ".join(picked)}]
        out.append({"messages": turns})
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return build_scratch_tokenizer(conversation_texts(conversations(100, 0)), vocab_size=300)


@pytest.fixture(scope="module")
def examples(tokenizer):
    kept, _ = tokenize_dataset(tokenizer, conversations(40, 1), 96)
    return kept


@pytest.mark.parametrize("config", [TINY_GPT, TINY_LLAMA], ids=["gpt2", "llama"])
def test_eval_loss_is_the_same_packed_or_not(tokenizer, examples, config):
    model = build_scratch_model(config, tokenizer, max_positions=128, seed=1).eval()
    settings = dict(micro_batch_size=4, max_seq_length=96)
    unpacked = evaluate_model(model, examples, packing=False, **settings)
    results = {
        mode: evaluate_model(model, examples, packing=True, attention_mode=mode, **settings)
        for mode in ("segments", "position_ids", "4d")
    }
    results["auto"] = evaluate_model(model, examples, packing=True, **settings)
    label_tokens = sum(int((e["labels"] != -100).sum()) for e in examples)
    assert unpacked["tokens"] == label_tokens  # every assistant token counts once
    for result in results.values():
        assert result["tokens"] == label_tokens
        assert result["loss"] == pytest.approx(unpacked["loss"], abs=1e-5)
        assert result["accuracy"] == pytest.approx(unpacked["accuracy"], abs=1e-9)
        assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert model.config._attn_implementation == "sdpa"  # evaluation leaves the model as it was


def test_loss_is_the_token_mean_cross_entropy(tokenizer, examples):
    """Reference: plain forward per example, mean over all assistant tokens of the set."""
    model = build_scratch_model(TINY_LLAMA, tokenizer, max_positions=128, seed=2).eval()
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for e in examples[:10]:
            ids = torch.tensor(e["input_ids"], dtype=torch.long)[None]
            labels = torch.tensor(e["labels"], dtype=torch.long)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            target = labels[1:]
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            correct += int((logits[keep].argmax(-1) == target[keep]).sum())
            count += int(keep.sum())
    result = evaluate_model(model, examples[:10], micro_batch_size=3, max_seq_length=96, packing=True)
    assert result["loss"] == pytest.approx(total / count, abs=1e-5)
    assert result["accuracy"] == pytest.approx(correct / count)


def test_logits_are_computed_in_chunks_and_never_kept(tokenizer, examples, monkeypatch):
    """The output layer sees at most a chunk of label positions at a time; only sums survive."""
    model = build_scratch_model(TINY_GPT, tokenizer, max_positions=128, seed=3).eval()
    reference = evaluate_model(model, examples, micro_batch_size=8, max_seq_length=96, packing=True)
    vocab = model.config.vocab_size
    monkeypatch.setattr(metrics, "LOGITS_PER_CHUNK", 7 * vocab)  # 7 positions per chunk
    rows: list[int] = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    try:
        chunked = evaluate_model(model, examples, micro_batch_size=8, max_seq_length=96, packing=True)
    finally:
        hook.remove()
    assert max(rows) <= 7 and sum(rows) == reference["tokens"]
    assert chunked["loss"] == pytest.approx(reference["loss"], abs=1e-6)
    assert chunked["accuracy"] == reference["accuracy"]
    assert set(chunked) == {"loss", "accuracy", "perplexity", "tokens", "examples"}


# ---------------------------------------------------------------------------- the step


def make_workspace(root: Path, *, eval_rows: int = 24, data=None, **params) -> StepContext:
    """A workspace after prepare/configure (tiny scratch model), then the train step;
    `data(n, seed)` makes the conversations (default: `conversations`)."""
    from chatbot_trainer.train.recipe import train

    data = data or conversations
    (root / "prepare").mkdir(parents=True)
    train_rows, held_out = data(120, 3), data(eval_rows, 4)
    for name, rows in (("train", train_rows), ("eval", held_out)):
        (root / "prepare" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = dict(
        training_data="data.jsonl", model_type="tiny-llama", training_steps=20, batch_size=8,
        micro_batch_size=4, learning_rate=3e-3, max_seq_length=96, warmup_steps=2, log_every=5,
        checkpoint_every=100, seed=0,
    )
    settings.update(params)
    tp = TrainingParams(**settings)
    choice = resolve_base_model("tiny-llama")
    base_dir = root / "configure" / "base-model"
    materialize_base_model(choice, base_dir, train_rows, 96, 0)
    ctx = StepContext(workspace=root, params=tp)
    ctx.write_result(
        "configure",
        {
            "base_model": choice.to_dict(), "base_model_path": str(base_dir), "device": "cpu",
            "precision": "fp32", "micro_batch_size": 4, "gradient_accumulation_steps": 2,
            "warmup_steps": 2, "target_modules": None, "train_base_weights": True, "params": tp.to_api(),
        },
    )
    ctx.write_result("train", train(ctx))
    return ctx


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("evaluate"))


def with_params(ctx: StepContext, **changes) -> StepContext:
    data = ctx.params.model_dump()
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section] = {**data[section], field: value}
        else:
            data[key] = value
    return StepContext(workspace=ctx.workspace, params=TrainingParams(**data))


def test_evaluate_step_reports_before_and_after(trained, tmp_path, monkeypatch):
    from chatbot_trainer.steps import run_step

    monkeypatch.setenv("CHATBOT_TERMINATION_LOG", str(tmp_path / "termination-log"))
    result = run_step("evaluate", trained)
    assert result["eval_split"] == "eval" and result["passed"] is True
    metrics, base = result["metrics"], result["base_metrics"]
    assert set(metrics) == set(base) == {"loss", "accuracy", "perplexity", "fact_recall", "rouge_l"}
    assert metrics["loss"] < base["loss"] - 1.0 and metrics["accuracy"] > base["accuracy"]
    assert metrics["rouge_l"] > base["rouge_l"]
    assert result["summary"] == {"metrics": metrics, "base_metrics": base,
                                 "answers": {"questions": 24, "facts": 0}}
    saved = json.loads((trained.workspace / "evaluate" / "metrics.json").read_text())
    assert saved["metrics"] == metrics and saved["eval_examples"] == 24
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["ok"] and message["summary"]["metrics"] == metrics

    limited = run_step("evaluate", with_params(trained, evaluation__max_eval_examples=5))
    assert limited["eval_examples"] == 5


def test_thresholds_fail_the_step_after_writing_metrics(trained):
    from chatbot_trainer.steps.evaluate import run

    metrics_file = trained.workspace / "evaluate" / "metrics.json"
    metrics_file.unlink(missing_ok=True)
    with pytest.raises(QualityThresholdNotMet) as info:
        run(with_params(trained, evaluation__max_loss=0.01))
    assert "evaluation.maxLoss 0.01" in info.value.message and "eval loss" in info.value.message
    assert info.value.exit_code == 3
    saved = json.loads(metrics_file.read_text())
    assert saved["passed"] is False and saved["metrics"]["loss"] > 0.01

    with pytest.raises(QualityThresholdNotMet) as info:
        run(with_params(trained, evaluation__min_accuracy=1.0))
    assert "evaluation.minAccuracy 1" in info.value.message

    passed = run(with_params(trained, evaluation__max_loss=50.0, evaluation__min_accuracy=0.0))
    assert passed["passed"] is True


def test_empty_eval_split_uses_a_training_sample(tmp_path):
    from chatbot_trainer.steps.evaluate import run

    ctx = make_workspace(tmp_path, eval_rows=0, training_steps=4)
    result = run(ctx)
    assert result["eval_split"] == "train-sample"
    assert result["eval_examples"] == 120


def test_samples_and_a_model_worse_than_its_base(trained, monkeypatch):
    """Answers side by side; a fine-tune that did not beat its base is a warning, or a failure
    with evaluation.requireImprovement."""
    from chatbot_trainer.steps import evaluate

    result = evaluate.run(with_params(trained, evaluation__sample_answers=2))
    assert len(result["samples"]) == 2 and result["warnings"] == []
    assert set(result["samples"][0]) == {"question", "reference", "base", "fine_tuned", "base_missed",
                                         "fine_tuned_missed"}
    scored = {row["question"]: row["fine_tuned"] for row in result["answers"]["per_question"]}
    assert all(scored[row["question"]] == row["fine_tuned"] for row in result["samples"])  # answered once
    assert "transformers" in result["samples_generated_with"]

    real_evaluate, calls = metrics.evaluate_model, []

    def fine_tuned_got_worse(model, examples, **settings):  # evaluate measures the fine-tune first
        calls.append(model)
        metrics = real_evaluate(model, examples, **settings)
        return {**metrics, "loss": 99.0} if len(calls) % 2 else metrics

    monkeypatch.setattr(metrics, "evaluate_model", fine_tuned_got_worse)
    warned = evaluate.run(with_params(trained, evaluation__sample_answers=0))
    assert warned["passed"] is True and warned["samples"] == []
    assert "not better than the base model" in warned["warnings"][0]
    assert warned["summary"]["warnings"] == warned["warnings"]
    with pytest.raises(QualityThresholdNotMet, match="evaluation.requireImprovement is set"):
        evaluate.run(with_params(trained, evaluation__require_improvement=True, evaluation__sample_answers=0))


def test_improvement_warning_wording():
    from chatbot_trainer.steps.evaluate import improvement_warning

    assert improvement_warning({"loss": 2.0, "accuracy": 0.5}, {"loss": 3.0, "accuracy": 0.4}) is None
    text = improvement_warning({"loss": 11.1, "accuracy": 0.002}, {"loss": 3.23, "accuracy": 0.38})
    assert "eval loss 11.1 vs 3.23" in text and "lower learningRate" in text


# ---------------------------------------------------------------------------- the output layer's loss


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_linear_cross_entropy_gives_cross_entropy_and_its_gradients(chunk):
    """Chunked, gradients taken in the forward pass: the same as cross_entropy on full logits,
    including confident rows, where softmax - one_hot is tiny at the target."""
    from chatbot_trainer.model.loss import linear_cross_entropy_sum

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=gen, dtype=torch.float64).float()
    weight = torch.randn(40, 16, generator=gen) * 0.5
    targets = torch.randint(0, 40, (23,), generator=gen)
    weight[targets[:4]] += 3 * hidden[:4]  # rows 0-3 predict their target with p > 0.999
    results = []
    for fn in (lambda h, w: linear_cross_entropy_sum(h, w, targets, chunk),
               lambda h, w: torch.nn.functional.cross_entropy(h @ w.t(), targets, reduction="sum")):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(h, w) * 0.5  # an incoming gradient other than 1
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    (loss, grad_h, grad_w), (ref_loss, ref_h, ref_w) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-4, atol=1e-6)
    softmax = torch.softmax(hidden[:4] @ weight.t(), dim=-1)
    assert softmax.gather(1, targets[:4, None]).min() > 0.999  # the confident rows are confident


def test_linear_cross_entropy_under_bf16_autocast_keeps_confident_gradients():
    from chatbot_trainer.model.loss import linear_cross_entropy_sum

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(32, 64, generator=gen)
    weight = torch.randn(300, 64, generator=gen) * 0.3
    targets = torch.randint(0, 300, (32,), generator=gen)
    weight[targets] += 0.2 * hidden  # most rows confident: p(target) 0.9 to 0.9999
    h_ref = hidden.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(h_ref @ weight.t(), targets, reduction="sum").backward()
    h = hidden.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy_sum(h, weight.to(torch.bfloat16), targets, 8).backward()
    cosine = torch.nn.functional.cosine_similarity(h.grad.float(), h_ref.grad, dim=-1)
    assert cosine.min() > 0.9999, cosine  # row by row, confident rows included


# ---------------------------------------------------------------------------- answers


PLANS = {"Gold": "$29", "Silver": "$19", "Bronze": "$9", "Basic": "$5"}


def fact_conversations(n: int, seed: int) -> list[dict]:
    """Questions whose answers hold checkable facts (a plan name, a price, a storage size)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        plan = rng.choice(sorted(PLANS))
        turns = [{"role": "user", "content": f"how much is {plan.lower()}?"},
                 {"role": "assistant", "content": f"The {plan} plan is {PLANS[plan]} per month."}]
        if rng.random() < 0.5:
            turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}, *turns]
        out.append({"messages": turns})
    return out


@pytest.fixture(scope="module")
def trained_on_facts(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("facts"), eval_rows=12, data=fact_conversations)


def test_every_held_out_question_is_answered_and_scored(trained_on_facts):
    from chatbot_api.status import Metrics, answer_status_metrics
    from chatbot_trainer.steps import run_step

    result = run_step("evaluate", with_params(trained_on_facts, evaluation__sample_answers=2))
    answers = result["answers"]
    assert answers["fine_tuned"]["questions"] == answers["base"]["questions"] == 12
    assert len(answers["per_question"]) == 12 and answers["fine_tuned"]["facts"] == 24  # plan + price
    for row in answers["per_question"]:
        assert row["facts"] and set(row["fine_tuned_missed"]) <= set(row["facts"])
        assert 0.0 <= row["fine_tuned_rouge_l"] <= 1.0
    for key in ("metrics", "base_metrics"):
        assert 0.0 <= result[key]["fact_recall"] <= 1.0 and 0.0 <= result[key]["rouge_l"] <= 1.0
    assert result["metrics"]["fact_recall"] == answers["fine_tuned"]["fact_recall"]
    saved = json.loads((trained_on_facts.workspace / "evaluate" / "metrics.json").read_text())
    assert saved["answers"]["per_question"] == answers["per_question"]
    status = Metrics.model_validate(answer_status_metrics(result["summary"])).to_api()
    assert status == {"factRecall": result["metrics"]["fact_recall"], "rougeL": result["metrics"]["rouge_l"],
                      "baseFactRecall": result["base_metrics"]["fact_recall"],
                      "baseRougeL": result["base_metrics"]["rouge_l"]}
    assert len(result["samples"]) == 2 and "fine_tuned_missed" in result["samples"][0]

    limited = run_step("evaluate", with_params(trained_on_facts, evaluation__answer_questions=5))
    assert limited["answers"]["fine_tuned"]["questions"] == 5
    skipped = run_step("evaluate", with_params(trained_on_facts, evaluation__answer_questions=0))
    assert "answers" not in skipped and "fact_recall" not in skipped["metrics"]
    assert len(skipped["samples"]) == 3  # the samples are still answered


def test_answer_gates_fail_and_pass_as_documented(trained_on_facts):
    from chatbot_trainer.steps.evaluate import run

    with pytest.raises(QualityThresholdNotMet, match=r"fact recall .* is below evaluation.minFactRecall 1:") as info:
        run(with_params(trained_on_facts, evaluation__min_fact_recall=1.0, evaluation__sample_answers=0))
    assert info.value.exit_code == 3
    saved = json.loads((trained_on_facts.workspace / "evaluate" / "metrics.json").read_text())
    assert saved["passed"] is False and "minFactRecall" in saved["failures"][0]
    with pytest.raises(QualityThresholdNotMet, match="answer ROUGE-L .* is below evaluation.minAnswerScore 1:"):
        run(with_params(trained_on_facts, evaluation__min_answer_score=1.0, evaluation__sample_answers=0))
    with pytest.raises(QualityThresholdNotMet, match="evaluation.minFactRecall is set but no held-out question"):
        run(with_params(trained_on_facts, evaluation__min_fact_recall=0.1, evaluation__answer_questions=0))
    passed = run(with_params(trained_on_facts, evaluation__min_fact_recall=0.0, evaluation__min_answer_score=0.0,
                             evaluation__sample_answers=0))
    assert passed["passed"] is True and passed["thresholds"]["min_fact_recall"] == 0.0


def test_answers_worse_than_the_base_are_a_warning_or_a_failure(trained_on_facts, monkeypatch):
    from chatbot_trainer.evaluate import samples
    from chatbot_trainer.steps import evaluate

    real_generate, calls = samples.generate_answers, []

    def fine_tuned_answers_wrong(model, tokenizer, questions, **kwargs):  # the fine-tune answers first
        calls.append(model)
        if len(calls) % 2:
            return ["I do not know." for _ in questions]
        return [q["reference"] for q in questions]  # a base that knows everything

    monkeypatch.setattr(samples, "generate_answers", fine_tuned_answers_wrong)
    warned = evaluate.run(with_params(trained_on_facts, evaluation__sample_answers=0))
    assert warned["passed"] is True
    assert warned["metrics"]["fact_recall"] == 0.0 and warned["base_metrics"]["fact_recall"] == 1.0
    [warning] = [w for w in warned["warnings"] if "answers are worse" in w]
    assert "fact recall 0.000 vs 1.000" in warning and warned["summary"]["warnings"] == warned["warnings"]
    saved = json.loads((trained_on_facts.workspace / "evaluate" / "metrics.json").read_text())
    assert warning in saved["warnings"]
    with pytest.raises(QualityThresholdNotMet, match="answers are worse.*evaluation.requireImprovement is set"):
        evaluate.run(with_params(trained_on_facts, evaluation__require_improvement=True, evaluation__sample_answers=0))
    assert real_generate is not samples.generate_answers
