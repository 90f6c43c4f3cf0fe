"""A failed local run leaves no result.json claiming success in its output directory."""

from __future__ import annotations

import json

import pytest

from chatbot_trainer import cli
from chatbot_trainer.previous_results import set_aside_previous_results


def _previous_run(out):
    """What a successful run leaves: result.json, details.json, model files, the workspace."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "bot.f16.gguf", out / "bot.q8_0.gguf", out / "Modelfile", out / "loss.png"]
    for path in files:
        path.write_text("old model")
    (out / "result.json").write_text(json.dumps({"model": {"path": str(files[0])}, "metrics": {"loss": 0.5}}))
    (out / "details.json").write_text(json.dumps({
        "files": [{"path": str(files[0]), "quantization": "f16"}, {"path": str(files[1]), "quantization": "q8_0"}],
        "modelfile": str(files[2]),
        "loss_curve": str(files[3]),
    }))
    (out / "notes.txt").write_text("the user's own file")
    return files


def test_failed_run_moves_the_previous_results_aside_and_says_so(tmp_path, capsys):
    out = tmp_path / "output"
    _previous_run(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n" * 5)
    code = cli.training_main(["run", "-q", "--training_data", str(bad), "-o", str(out), "--model_type", "tiny-gpt"])
    assert code == 2
    assert not (out / "result.json").exists() and not (out / "details.json").exists()
    assert not list(out.glob("*.gguf")) and not (out / "Modelfile").exists()
    assert not (out / "loss.png").exists()
    aside = out / "previous-run"
    assert sorted(p.name for p in aside.iterdir()) == [
        "Modelfile", "bot.f16.gguf", "bot.q8_0.gguf", "details.json", "loss.png", "result.json"]
    assert (out / "notes.txt").read_text() == "the user's own file"
    err = capsys.readouterr().err
    assert f"{out} holds no result.json from this run; the previous run's results are in {aside}" in err


def test_a_second_failure_replaces_the_older_aside(tmp_path):
    out = tmp_path / "output"
    _previous_run(out)
    first = set_aside_previous_results(out)
    (out / "result.json").write_text("{}")
    assert set_aside_previous_results(out) == first
    assert sorted(p.name for p in first.iterdir()) == ["result.json"]
    assert set_aside_previous_results(out) is None


def test_resume_keeps_the_model_files(tmp_path):
    out = tmp_path / "output"
    files = _previous_run(out)
    aside = set_aside_previous_results(out, keep_model_files=True)
    assert sorted(p.name for p in aside.iterdir()) == ["details.json", "result.json"]
    assert all(path.is_file() for path in files)


def test_files_outside_the_output_directory_are_not_touched(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere.gguf"
    elsewhere.write_text("x")
    (out / "result.json").write_text("{}")
    (out / "details.json").write_text(json.dumps({"files": [{"path": str(elsewhere)}], "modelfile": "/etc/passwd"}))
    set_aside_previous_results(out)
    assert elsewhere.is_file()


@pytest.mark.parametrize("present", [["details.json"], []])
def test_nothing_or_partial_results(tmp_path, present):
    out = tmp_path / "output"
    out.mkdir()
    for name in present:
        (out / name).write_text("{}")
    aside = set_aside_previous_results(out)
    assert (aside is None) == (not present)
    assert not (out / "details.json").exists()
