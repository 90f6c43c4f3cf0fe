"""Base-model resolution: presets, offline fallback, local and pvc:// directories."""

from __future__ import annotations

import json

import pytest

from chatbot_trainer.models import ModelNotFoundError, resolve_base_model


def test_presets_fall_back_to_a_scratch_model_offline_and_say_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    choice = resolve_base_model("gpt")
    assert choice.source == "scratch" and choice.architecture == "gpt2"
    assert "openai-community/gpt2" in choice.label and "random init" in choice.label


def test_presets_use_the_hub_when_online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    choice = resolve_base_model("qwen2")
    assert (choice.source, choice.name_or_path) == ("hub", "Qwen/Qwen2.5-0.5B-Instruct")
    assert resolve_base_model("org/some-model").source == "hub"


def test_local_and_pvc_directories(tmp_path, monkeypatch):
    model = tmp_path / "claim" / "models" / "base"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_base_model(str(model)).source == "local"
    monkeypatch.setenv("CHATBOT_PVC_ROOT", str(tmp_path))
    choice = resolve_base_model("pvc://claim/models/base")
    assert (choice.source, choice.name_or_path, choice.architecture) == ("local", str(model), "llama")
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        resolve_base_model("pvc://claim/models/missing")
    with pytest.raises(ModelNotFoundError, match="inside the claim"):
        resolve_base_model("pvc://claim/../etc")


def test_unknown_model_type_lists_the_choices():
    with pytest.raises(ModelNotFoundError, match="use a preset"):
        resolve_base_model("not-a-model")
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_base_model("./")
