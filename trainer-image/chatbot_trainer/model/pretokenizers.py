"""Pre-tokenizers: tokenizer.json's split rules and llama.cpp's names for them (`tokenizer.ggml.pre`).

The GGUF writer names the pre-tokenizer of a Hugging Face tokenizer; the GGUF importer rebuilds
tokenizer.json's pre-tokenizer from the name.
"""

from __future__ import annotations

from typing import Any

# Pre-tokenizer split regexes as tokenizer.json spells them.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Pre-tokenizer step signatures → llama.cpp's `tokenizer.ggml.pre` name.
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel+regex",): "gpt-2",
    ("split:" + GPT2_SPLIT, "bytelevel"): "gpt-2",
    ("split:" + LLAMA3_SPLIT, "bytelevel"): "llama-bpe",
    ("split:" + QWEN2_SPLIT, "bytelevel"): "qwen2",
    ("digits:individual", "bytelevel+regex"): "smollm",
}


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(pattern: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def pre_tokenizer_for(ggml_pre: str) -> dict[str, Any] | None:
    """tokenizer.json's pre_tokenizer for a llama.cpp pre-tokenizer name (None: unknown)."""
    known = {  # ByteLevel with use_regex=True applies the GPT-2 split itself
        "gpt-2": _byte_level(True),
        "gpt2": _byte_level(True),
        "smollm": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, _byte_level(True)]},
        "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_SPLIT), _byte_level(False)]},
        "qwen2": {"type": "Sequence", "pretokenizers": [_split(QWEN2_SPLIT), _byte_level(False)]},
    }
    return known.get(ggml_pre)
