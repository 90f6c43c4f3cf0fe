"""What `chatbot-training run` prints and writes, from the steps' results (steps faked: fast)."""

from __future__ import annotations

import json

import pytest

from chatbot_trainer import cli, pipeline

WARNING = "the fine-tuned model's answers are worse than the base model's on 2 held-out questions: …"
TEMPLATE_WARNING = "the chat template has no tool support"
ANSWERS = {
    "fine_tuned": {"rouge_l": 0.41, "fact_recall": 0.25, "facts": 4, "facts_stated": 1, "questions": 2,
                   "questions_with_facts": 2},
    "base": {"rouge_l": 0.2, "fact_recall": 0.5, "facts": 4, "facts_stated": 2, "questions": 2,
             "questions_with_facts": 2},
    "per_question": [],
}


def fake_results(tmp_path) -> dict:
    metrics = {"loss": 1.2, "accuracy": 0.6, "perplexity": 3.32, "fact_recall": 0.25, "rouge_l": 0.41}
    base = {"loss": 2.0, "accuracy": 0.4, "perplexity": 7.39, "fact_recall": 0.5, "rouge_l": 0.2}
    model = {"path": str(tmp_path / "bot.f16.gguf"), "format": "gguf", "size_mb": 1.0, "files": []}
    return {
        "prepare": {"report": {"train": 10}, "summary": {}},
        "configure": {
            "base_model": {"label": "tiny-gpt"}, "training_steps": 12,
            "training_steps_reason": "epochs 3 × 16 packed training sequences / batchSize 4, rounded up",
            "learning_rate": 0.001, "learning_rate_reason": "default for a model built from a config",
            "chat_template": {"warnings": [TEMPLATE_WARNING]}, "params": {}, "device": "cpu",
            "precision": "fp32", "micro_batch_size": 4, "gradient_accumulation_steps": 1, "warmup_steps": 1,
            "target_modules": [], "train_base_weights": True, "architecture": "GPT2LMHeadModel",
            "summary": {"warnings": [TEMPLATE_WARNING]},
        },
        "train": {"summary": {"train_loss": 1.0, "steps": 12}},
        "evaluate": {
            "metrics": metrics, "base_metrics": base, "warnings": [WARNING], "answers": ANSWERS,
            "samples": [{"question": "price?", "reference": "The Pro plan is $29.", "base": "$29",
                         "fine_tuned": "It is $10.", "fine_tuned_missed": ["Pro", "$29"], "base_missed": ["Pro"]}],
            "summary": {"metrics": metrics, "base_metrics": base, "warnings": [WARNING]},
        },
        "export": {"summary": {"model": model}},
    }


@pytest.fixture
def faked_steps(tmp_path, monkeypatch):
    results = fake_results(tmp_path)
    monkeypatch.setattr(pipeline, "run_step", lambda step, ctx, termination_log=None:
                        {**results[step], "seconds": 0.1})
    return results


def test_every_warning_and_the_answer_metrics_reach_every_output(tmp_path, faked_steps, capsys):
    out = tmp_path / "out"
    assert cli.training_main(["run", "--training_data", "x.jsonl", "--epochs", "3", "-o", str(out)]) == 0
    printed, stderr = capsys.readouterr()
    printed = json.loads(printed)
    written = json.loads((out / "result.json").read_text())
    details = json.loads((out / "details.json").read_text())
    assert printed == written
    assert written["warnings"] == details["warnings"] == [TEMPLATE_WARNING, WARNING]
    assert written["metrics"] == {"loss": 1.2, "accuracy": 0.6, "perplexity": 3.32, "fact_recall": 0.25,
                                  "rouge_l": 0.41}
    assert written["base_metrics"]["fact_recall"] == 0.5
    assert written["training"] == {
        "steps": 12, "steps_from": faked_steps["configure"]["training_steps_reason"],
        "learning_rate": 0.001, "learning_rate_from": "default for a model built from a config"}
    assert details["answers"] == ANSWERS and details["config"]["training_steps"] == 12
    assert f"WARNING: {WARNING}" in stderr and f"WARNING: {TEMPLATE_WARNING}" in stderr
    assert ("answers to 2 held-out questions, base → fine-tuned: fact recall 50% → 25% (2 → 1 of 4 facts), "
            "ROUGE-L 0.200 → 0.410") in stderr
    assert "trained 12 steps (epochs 3 × 16 packed training sequences / batchSize 4, rounded up)" in stderr
    assert "[missed: Pro, $29]" in stderr

    assert cli.training_main(["run", "-q", "--training_data", "x.jsonl", "-o", str(tmp_path / "quiet")]) == 0
    assert f"WARNING: {WARNING}" in capsys.readouterr().err  # warnings even when quiet


def test_epochs_and_training_steps_flags(tmp_path, faked_steps, capsys):
    assert cli.training_main(["run", "-q", "--training_data", "x.jsonl", "--epochs", "2",
                              "--training_steps", "5", "-o", str(tmp_path / "o")]) == 2
    assert "--epochs and --training_steps are mutually exclusive" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("trainingData: x.jsonl\ntrainingSteps: 50\n")
    # a flag overrides the file: --epochs replaces its trainingSteps
    assert cli.training_main(["run", "-q", "-f", str(config), "--epochs", "2", "-o", str(tmp_path / "p")]) == 0
    marker = json.loads((tmp_path / "p" / "workspace" / pipeline.MARKER).read_text())
    assert marker["params"]["epochs"] == 2.0 and "trainingSteps" not in marker["params"]
