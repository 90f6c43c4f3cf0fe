"""End to end: raw JSONL → prepare → configure → train → evaluate → export → a GGUF that
independent readers load. Once through the local runner, once step by step through the
`chatbot-trainer` command as the Kubernetes Jobs run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatbot_trainer import cli

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data" / "support.jsonl"
SMALL_RUN = ["--model_type", "tiny-gpt", "--training_steps", "40", "--batch_size", "8",
             "--learning_rate", "0.003", "--set", "maxSeqLength=256", "--set", "checkpointEvery=20"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = cli.training_main(["run", "-q", "--training_data", str(DATA), "--name", "bot", "-o", str(out), *SMALL_RUN])
    assert code == 0
    return out


def test_prints_and_writes_the_seed_output(local_run, capsys):
    result = json.loads((local_run / "result.json").read_text())
    assert set(result) == {"model", "metrics", "base_metrics", "training", "warnings"}
    assert set(result["model"]) == {"path", "format", "size_mb"}
    assert set(result["metrics"]) == set(result["base_metrics"]) == {
        "loss", "accuracy", "perplexity", "fact_recall", "rouge_l"}
    assert result["training"]["steps"] == 40 and result["training"]["learning_rate"] == 0.003
    assert result["model"]["format"] == "gguf"
    gguf = Path(result["model"]["path"])
    assert gguf.is_file() and gguf.name == "bot.f16.gguf"
    assert result["model"]["size_mb"] == pytest.approx(gguf.stat().st_size / 2**20, abs=0.01)
    assert 0.0 <= result["metrics"]["accuracy"] <= 1.0
    assert result["metrics"]["perplexity"] == pytest.approx(2.718281828 ** result["metrics"]["loss"], rel=1e-3)


def test_details_show_data_report_timings_config_and_learning(local_run):
    details = json.loads((local_run / "details.json").read_text())
    assert details["data"]["malformed"] == 3 and details["data"]["dropped"]["duplicate"] >= 1
    assert set(details["timings_seconds"]) == {"prepare", "configure", "train", "evaluate", "export"}
    assert details["config"]["params"]["trainingSteps"] == 40
    answers = details["answers"]
    assert answers["fine_tuned"]["questions"] == answers["held_out_questions"] == len(answers["per_question"]) == 61
    assert details["metrics"]["fact_recall"] == answers["fine_tuned"]["fact_recall"]
    assert "tiny-gpt" in details["base_model"]
    # The model learned: eval loss below the base model's, training loss fell.
    assert details["metrics"]["loss"] < details["base_metrics"]["loss"]
    assert details["train"]["train_loss"] < details["train"]["initial_loss"]
    assert {f["quantization"] for f in details["files"]} == {"f16", "q8_0"}
    assert Path(details["modelfile"]).read_text().startswith("FROM ")
    assert details["loss_curve"] == str(local_run / "loss.png")
    assert (local_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (local_run / "workspace" / "train" / "tensorboard").is_dir()


def test_gguf_loads_in_transformers(local_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = json.loads((local_run / "result.json").read_text())
    gguf = Path(result["model"]["path"])
    merged = local_run / "workspace" / "export" / "merged"
    reference = AutoModelForCausalLM.from_pretrained(merged).eval()
    config = reference.config
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "How do I reset my password?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        delta = (reference(ids).logits - loaded(ids).logits).abs().max().item()
    assert delta < 1e-2


@pytest.mark.llama_cpp
def test_gguf_loads_in_llama_cpp_and_stops(local_run):
    import llama_cpp  # installed by scripts/bootstrap.sh --llama (the test command)

    result = json.loads((local_run / "result.json").read_text())
    for path in [result["model"]["path"], result["model"]["path"].replace(".f16.", ".q8_0.")]:
        llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=1, verbose=False)
        out = llm.create_chat_completion([{"role": "user", "content": "How do I reset my password?"}],
                                         max_tokens=48, temperature=0.0)
        choice = out["choices"][0]
        assert isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")


def test_steps_as_jobs_run_them(tmp_path):
    """The five `chatbot-trainer <step>` processes, sharing one workspace like the Jobs do."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"name": "job-bot", "trainingData": str(DATA), "modelType": "tiny-llama",
                                  "trainingSteps": 12, "batchSize": 4, "learningRate": 0.003,
                                  "maxSeqLength": 256, "export": {"quantizations": ["q8_0"]}}))
    workspace = tmp_path / "ws"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    messages = {}
    for step in ("prepare", "configure", "train", "evaluate", "export"):
        term = tmp_path / f"{step}.term"
        proc = subprocess.run(
            [sys.executable, "-m", "chatbot_trainer.cli", step, "--workspace", str(workspace),
             "--config", str(config), "--termination-log", str(term)],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (workspace / step / "result.json").is_file()
        messages[step] = json.loads(term.read_text())
        assert messages[step]["ok"] is True and len(term.read_bytes()) <= 4096
    assert set(messages["evaluate"]["summary"]["metrics"]) >= {"loss", "accuracy", "perplexity"}
    model = messages["export"]["summary"]["model"]
    assert model["format"] == "gguf" and model["path"].endswith("job-bot.q8_0.gguf")
    assert Path(model["path"]).is_file()
