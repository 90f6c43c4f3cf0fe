"""Settings from flags and files, and the errors users see for bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from chatbot_trainer import cli
from chatbot_trainer.errors import InvalidConfig
from chatbot_trainer.params import read_config_file, trainer_params
from chatbot_trainer.workspace import compact_message, write_termination_message

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_seed_defaults():
    params = trainer_params({"training_data": "x.jsonl"})
    assert (params.model_type, params.training_steps, params.batch_size, params.learning_rate) == (
        "gpt", 1000, 8, None)  # the learning rate is the base model's default (configure step)


def test_epochs_instead_of_training_steps():
    params = trainer_params({"training_data": "x.jsonl", "epochs": 2.5})
    assert (params.epochs, params.training_steps) == (2.5, None)
    assert "trainingSteps" not in params.to_api() and params.to_api()["epochs"] == 2.5
    with pytest.raises(InvalidConfig, match="trainingSteps and epochs are mutually exclusive"):
        trainer_params({"training_data": "x.jsonl", "epochs": 2, "training_steps": 100})
    with pytest.raises(InvalidConfig, match="epochs: Input should be greater than 0"):
        trainer_params({"training_data": "x.jsonl", "epochs": 0})


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"training_data": "x", "training_steps": -5}, "trainingSteps: Input should be greater than or equal to 1 (got -5)"),
        ({"training_data": "x", "batch_size": 0}, "batchSize: Input should be greater than or equal to 1 (got 0)"),
        ({"training_data": "x", "learning_rate": 3}, "learningRate: Input should be less than or equal to 1 (got 3)"),
        ({"training_data": "x", "learning_rate": 0}, "learningRate: Input should be greater than 0"),
        ({"training_data": "x", "batch_size": 8, "micro_batch_size": 3}, "batchSize must be a multiple of microBatchSize"),
        ({"training_data": "x", "lora": {"rnk": 4}}, "lora.rnk: unknown setting"),
        ({}, "trainingData: Field required"),
    ],
)
def test_invalid_settings_name_the_field(data, fragment):
    with pytest.raises(InvalidConfig) as err:
        trainer_params(data)
    assert fragment in err.value.message
    assert err.value.exit_code == 2


def test_cluster_fields_are_ignored_by_the_trainer():
    params = trainer_params({"trainingData": "x", "gpu": {"count": 2}, "nodeSelector": {"a": "b"}, "suspend": True})
    assert params.training_data == "x"


def test_seed_inputs_block_and_manifest_are_accepted(tmp_path):
    seed = tmp_path / "inputs.yaml"
    seed.write_text(yaml.safe_dump({"inputs": {"training_data": "/data/chatbot/training.jsonl", "model_type": "gpt",
                                               "training_steps": 2000, "batch_size": 16, "learning_rate": 0.0001}}))
    params = trainer_params(read_config_file(seed))
    assert (params.training_steps, params.batch_size) == (2000, 16)
    manifest = tmp_path / "cbt.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": "chatbot.dev/v1alpha1", "kind": "ChatbotTraining",
                                        "metadata": {"name": "support-bot"},
                                        "spec": {"trainingData": "pvc://d/x.jsonl", "gpu": {"count": 1}}}))
    data = read_config_file(manifest)
    assert data["name"] == "support-bot"
    assert trainer_params({k: v for k, v in data.items() if k != "name"}).training_data == "pvc://d/x.jsonl"


def test_yaml_numbers_as_kubectl_reads_them(tmp_path):
    config = tmp_path / "inputs.yaml"
    config.write_text("inputs:\n  training_data: x.jsonl\n  learning_rate: 1e-4\n  batch_size: 16\n")
    params = trainer_params(read_config_file(config))
    assert (params.learning_rate, params.batch_size) == (0.0001, 16)


def test_strings_are_not_numbers_as_for_the_api_server():
    with pytest.raises(InvalidConfig, match="trainingSteps"):
        trainer_params({"training_data": "x", "training_steps": "100"})


def test_set_reaches_nested_fields():
    data = {"training_data": "x"}
    from chatbot_trainer.params import set_nested

    set_nested(data, "lora.rank", "8")
    set_nested(data, "learningRate", "2e-4")
    set_nested(data, "export.quantizations", "[q8_0, f16]")
    params = trainer_params(data)
    assert (params.lora.rank, params.learning_rate, params.export.quantizations) == (8, 0.0002, ["q8_0", "f16"])


def test_run_flags_underscore_and_hyphen():
    parser = cli.build_run_parser()
    a = parser.parse_args(["run", "--training_data", "d.jsonl", "--training-steps", "5", "--batch-size", "2",
                           "--learning_rate", "0.01", "--model-type", "tiny-gpt"])
    assert (a.training_data, a.training_steps, a.batch_size, a.learning_rate, a.model_type) == (
        "d.jsonl", 5, 2, 0.01, "tiny-gpt")


def test_run_reports_missing_data_and_bad_values(tmp_path, capsys):
    assert cli.training_main(["run", "-q", "--training_data", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert "training data not found" in capsys.readouterr().err
    assert cli.training_main(["run", "-q", "--training_data", "x", "--batch_size", "0", "-o", str(tmp_path / "o")]) == 2
    assert "batchSize" in capsys.readouterr().err
    assert cli.training_main(["run", "-q", "-o", str(tmp_path / "o")]) == 2
    assert "--training_data is required" in capsys.readouterr().err


def test_run_refuses_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = cli.training_main(["run", "-q", "--training_data", str(EXAMPLES / "data" / "support.jsonl"),
                              "-o", str(blocker / "out")])
    assert code == 2
    assert "cannot write to output directory" in capsys.readouterr().err


def test_run_never_wipes_a_foreign_workspace(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    code = cli.training_main(["run", "-q", "--training_data", str(EXAMPLES / "data" / "support.jsonl"),
                              "-o", str(tmp_path / "o"), "--workspace", str(foreign)])
    assert code == 2
    assert (foreign / "precious.txt").read_text() == "keep"
    assert "not created by chatbot-training" in capsys.readouterr().err


def test_step_cli_writes_result_and_termination_message(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"trainingData": str(EXAMPLES / "data" / "support.jsonl"), "name": "bot"}))
    term = tmp_path / "term"
    code = cli.trainer_main(["prepare", "--workspace", str(tmp_path / "ws"), "--config", str(config),
                             "--termination-log", str(term)])
    assert code == 0
    message = json.loads(term.read_text())
    assert message["ok"] is True and message["step"] == "prepare"
    assert message["summary"]["malformed"] == 3
    result = json.loads((tmp_path / "ws" / "prepare" / "result.json").read_text())
    assert result["report"]["train"] == message["summary"]["train"]


def test_step_cli_failure_is_one_line_with_reason(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"trainingData": str(tmp_path / "missing.jsonl")}))
    term = tmp_path / "term"
    code = cli.trainer_main(["prepare", "--workspace", str(tmp_path / "ws"), "--config", str(config),
                             "--termination-log", str(term)])
    assert code == 2
    message = json.loads(term.read_text())
    assert message == {"step": "prepare", "ok": False, "reason": "InvalidData", "message": message["message"]}
    assert "missing.jsonl" in message["message"]
    assert not (tmp_path / "ws" / "prepare" / "result.json").exists()
    err = capsys.readouterr().err.strip().splitlines()
    # The step's start, then the reason in one line (no traceback).
    assert len(err) == 2 and "prepare: starting" in err[0] and err[1].startswith("error: ")


def test_step_needs_earlier_step(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"trainingData": "x.jsonl"}))
    code = cli.trainer_main(["configure", "--workspace", str(tmp_path / "ws"), "--config", str(config),
                             "--termination-log", str(tmp_path / "t")])
    assert code == 2
    assert "prepare step has not finished" in json.loads((tmp_path / "t").read_text())["message"]


def test_termination_message_fits_4k():
    payload = {"step": "prepare", "ok": True,
               "summary": {"metrics": {"loss": 1.0}, "errors": ["x" * 500] * 20, "other": "y" * 3000}}
    text = compact_message(payload)
    assert len(text.encode()) <= 4096
    assert json.loads(text)["summary"]["metrics"] == {"loss": 1.0}


def test_termination_log_env(tmp_path, monkeypatch):
    target = tmp_path / "msg"
    monkeypatch.setenv("CHATBOT_TERMINATION_LOG", str(target))
    write_termination_message(None, {"step": "x", "ok": True})
    assert json.loads(target.read_text())["ok"] is True
