"""A GGUF file as a base model: dequantized once into a normal model directory.

transformers reads GGUF files (`from_pretrained(dir, gguf_file=name)`): it dequantizes every
tensor to float32 and rebuilds the tokenizer from the file's vocabulary and merges. Such a model
refuses `save_pretrained` ("quantized with gguf and is not serializable"), so its weights are
moved into a plain model built from the same config and saved from there, with the tokenizer.

One correction: transformers turns every byte-level BPE vocabulary into a GPT-2 pre-tokenizer,
whatever the file's `tokenizer.ggml.pre` says. Where that name is one llama.cpp splits
differently (SmolLM's single digits, Llama 3's and Qwen2's patterns), the saved tokenizer gets
the pre-tokenizer the model was trained with, so training, llama.cpp and the re-exported file
all tokenize the same way.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chatbot_trainer.errors import ModelNotFound, UnsupportedArchitecture
from chatbot_trainer.model.pretokenizers import pre_tokenizer_for
from chatbot_trainer.workspace import replace_dir_atomically

# GGUF value types (gguf.GGUFValueType) → struct format of the fixed-size ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_header(path: Path) -> dict[str, Any]:
    """The scalar and string key/values of a GGUF file's header (arrays skipped).

    gguf.GGUFReader maps every tensor and array element, seconds for a 50k-token vocabulary;
    this reads only the few values a base model is described by, in milliseconds."""
    import struct

    def read(handle, fmt: str):
        size = struct.calcsize(fmt)
        data = handle.read(size)
        if len(data) != size:
            raise ValueError("file ends inside the header")
        return struct.unpack(fmt, data)[0]

    def read_string(handle) -> bytes:
        return handle.read(read(handle, "<Q"))

    def skip(handle, kind: int) -> None:
        if kind in _SCALARS:
            handle.seek(struct.calcsize(_SCALARS[kind]), 1)
        elif kind == _STRING:
            handle.seek(read(handle, "<Q"), 1)
        elif kind == _ARRAY:
            inner, count = read(handle, "<I"), read(handle, "<Q")
            if inner in _SCALARS:
                handle.seek(count * struct.calcsize(_SCALARS[inner]), 1)
            else:
                for _ in range(count):
                    skip(handle, inner)
        else:
            raise ValueError(f"unknown value type {kind}")

    values: dict[str, Any] = {}
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise ValueError("no GGUF magic number at the start")
            version = read(handle, "<I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (2 and 3 are read)")
            read(handle, "<Q")  # tensor count
            for _ in range(read(handle, "<Q")):
                key = read_string(handle).decode("utf-8", "replace")
                kind = read(handle, "<I")
                if kind in _SCALARS:
                    values[key] = read(handle, _SCALARS[kind])
                elif kind == _STRING:
                    values[key] = read_string(handle).decode("utf-8", "replace")
                else:
                    skip(handle, kind)
    except (OSError, ValueError, struct.error) as exc:
        raise ModelNotFound(f"{path} is not a readable GGUF file ({exc})") from exc
    return values


def read_metadata(path: Path) -> dict[str, Any]:
    """Architecture, quantization (as llama.cpp names it) and tokenizer facts of a GGUF file."""
    import gguf

    header = read_header(path)
    file_type = header.get("general.file_type")
    try:
        quantization = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except (TypeError, ValueError):
        quantization = "unknown" if file_type is None else f"file type {file_type}"
    return {
        "architecture": header.get("general.architecture"),
        "name": header.get("general.name"),
        "quantization": quantization,
        "tokenizer_model": header.get("tokenizer.ggml.model"),
        "tokenizer_pre": header.get("tokenizer.ggml.pre"),
    }


def import_gguf(path: Path, out_dir: Path, *, show_progress: bool = False) -> dict[str, Any]:
    """Dequantize the GGUF file at `path` into `out_dir` (replaced atomically); describe it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    meta = read_metadata(path)
    if meta["tokenizer_model"] not in ("gpt2", None):
        raise UnsupportedArchitecture(
            f"{path.name} has a {meta['tokenizer_model']!r} tokenizer; GGUF base models need a byte-level "
            "BPE tokenizer (tokenizer.ggml.model = gpt2), which the GGUF export can write back"
        )
    if not show_progress:
        hf_logging.disable_progress_bar()
    try:
        with _one_reader_per_file():
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            if config.model_type == "gpt2":  # transformers reads gpt2.context_length into n_ctx only
                config.n_positions = config.n_ctx
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                          dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise UnsupportedArchitecture(
            f"transformers cannot read {path.name} ({meta['architecture']}, {meta['quantization']}): {exc}"
        ) from exc

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    parameters = sum(p.numel() for p in model.parameters())
    del loaded

    with replace_dir_atomically(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        corrected = _restore_pre_tokenizer(tmp / "tokenizer.json", meta["tokenizer_pre"])
    return {
        "file": str(path),
        "architecture": meta["architecture"],
        "quantization": meta["quantization"],
        "tokenizer_pre": meta["tokenizer_pre"],
        "pre_tokenizer_restored": corrected,
        "parameters": parameters,
        "model_dir": str(out_dir),
    }


@contextmanager
def _one_reader_per_file():
    """transformers opens the file with gguf.GGUFReader for the config, the weights and the
    tokenizer, and each opening parses every metadata array (seconds for a 49k vocabulary);
    it also builds gguf's tensor-name map once per tensor. Both are pure: within this block
    the same read-only reader and the same map are handed out again (about 2x faster)."""
    import functools

    import gguf

    original_reader, original_map, readers = gguf.GGUFReader, gguf.get_tensor_name_map, {}

    def shared_reader(path, *args, **kwargs):
        key = (str(Path(path).resolve()), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def _restore_pre_tokenizer(tokenizer_json: Path, ggml_pre: str | None) -> bool:
    """Give the saved tokenizer the pre-tokenizer the GGUF file names; True when it changed."""
    wanted = pre_tokenizer_for(ggml_pre or "")
    if wanted is None or not tokenizer_json.is_file():
        return False
    data = json.loads(tokenizer_json.read_text())
    if data.get("pre_tokenizer") == wanted:
        return False
    data["pre_tokenizer"] = wanted
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False, indent=2))
    return True
