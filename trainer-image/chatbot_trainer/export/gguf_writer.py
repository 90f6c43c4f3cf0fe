"""Hugging Face model directory → GGUF file that llama.cpp (and so Ollama) can serve.

Input: a directory written by `save_pretrained` (config.json, *.safetensors, tokenizer.json,
tokenizer_config.json, chat_template.jinja). Output: one GGUF file per call, written through a
temporary file and renamed, so a killed export never leaves a half file under the final name.

Supported, exactly:
  models      GPT2LMHeadModel → arch "gpt2"; LlamaForCausalLM and MistralForCausalLM → arch
              "llama" (rope: default, linear, llama3; no attention/MLP biases); Qwen2ForCausalLM
              → arch "qwen2" (q/k/v biases, no sliding window).
  tokenizers  byte-level BPE from tokenizer.json (`tokenizer.ggml.model = "gpt2"`) whose
              pre-tokenizer is GPT-2's (→ "gpt-2"), Llama 3's (→ "llama-bpe"), Qwen2's
              (→ "qwen2") or SmolLM's (digits + GPT-2, → "smollm"). Sentencepiece tokenizers
              (tokenizer.model, byte-fallback BPE) and any other pre-tokenizer are refused:
              writing them anyway would give a file that tokenizes differently from the model.
  types       f32, f16, bf16, q8_0, q4_0. 1-D tensors (norms, biases) stay F32; q8_0/q4_0 apply
              to 2-D weights whose rows are a multiple of 32 values, other 2-D weights fall back
              to F16 and are listed in the result.

Tensors are streamed one at a time (header first, then data), so memory stays near one tensor.
Each tensor is read in its stored dtype and converted once, with torch: F16 directly from the
stored bf16/f32 values, Q8_0 by `quantize_q8_0` (bit-identical to ggml's reference and to
gguf.quants, ~4x faster than the latter); F32, BF16 and Q4_0 go through gguf.quants.
numpy, safetensors, torch and gguf are imported inside functions.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from chatbot_trainer.errors import StepError, UnsupportedArchitecture
from chatbot_trainer.model.pretokenizers import PRE_TOKENIZERS

# HF `architectures[0]` → GGUF architecture name.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0", "q4_0")
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


def strip_generation_tags(template: str) -> str:
    """Drop transformers' `{% generation %}` markers: other Jinja engines do not know them."""
    return _GENERATION_TAG.sub("", template)


@dataclass
class GGUFFile:
    """What one written GGUF file holds."""

    path: Path
    quantization: str
    arch: str
    tensor_count: int
    tensor_types: dict[str, int]  # GGML type name → number of tensors
    fallbacks: list[str] = field(default_factory=list)  # 2-D tensors written as F16 instead
    tokenizer_pre: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "quantization": self.quantization,
            "arch": self.arch,
            "tensor_count": self.tensor_count,
            "tensor_types": self.tensor_types,
            "fallbacks": self.fallbacks,
            "tokenizer_pre": self.tokenizer_pre,
            "notes": self.notes,
            "size_bytes": self.size_bytes,
        }


@dataclass
class _Planned:
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # numpy shape as written (ggml reverses it)
    qtype: Any  # gguf.GGMLQuantizationType
    load: Callable[[], Any]  # → tensor of `shape` (torch, any float dtype; or a numpy array)


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    eot_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    notes: list[str]


# ---------------------------------------------------------------------------- entry points


def write_gguf(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    quantization: str = "f16",
    *,
    name: str | None = None,
    base_model: str | dict[str, str] | None = None,
    finetune: str | None = "lora-chat",
    description: str | None = None,
) -> GGUFFile:
    """Convert the model in `model_dir` to `out_path` (atomically) and describe what was written."""
    import gguf
    import numpy as np

    model_dir, out_path = Path(model_dir), Path(out_path)
    quantization = quantization.lower()
    if quantization not in QUANTIZATIONS:
        raise StepError(
            f"unknown quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}",
            reason="InvalidConfig",
            exit_code=2,
        )
    config = load_config(model_dir)
    hf_arch, arch = _architecture(config, model_dir)
    vocab = read_vocab(model_dir, config)
    notes = list(vocab.notes)
    tensors, hparams = _plan(model_dir, config, hf_arch, arch, quantization, len(vocab.tokens), notes)
    fallbacks = [t.name for t in tensors if t.qtype == gguf.GGMLQuantizationType.F16 and quantization in ("q8_0", "q4_0")]

    model_name = name or model_dir.name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _write_metadata(writer, arch, hparams, quantization, model_name, base_model, finetune, description)
        _write_vocab(writer, vocab)
        for t in tensors:
            nbytes = _nbytes(t.shape, t.qtype)
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            writer.write_tensor_data(_tensor_data(t))
        writer.flush()
        for handle in writer.fout or []:
            os.fsync(handle.fileno())
        writer.close()
        apply_default_mode(tmp)
        os.replace(tmp, out_path)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    types: dict[str, int] = {}
    for t in tensors:
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    return GGUFFile(out_path, quantization, arch, len(tensors), types, fallbacks, vocab.pre, notes)


def preflight(model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> str:
    """Fail early (before an expensive merge) when the model or its tokenizer cannot be exported.

    Returns the GGUF architecture name."""
    _, arch = _architecture(load_config(Path(model_dir)), Path(model_dir))
    read_vocab(Path(tokenizer_dir or model_dir), {})
    return arch


def _architecture(config: dict[str, Any], model_dir: Path) -> tuple[str, str]:
    hf_arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"cannot export {hf_arch} ({model_dir}) to GGUF: supported architectures are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}; for other models use llama.cpp's convert_hf_to_gguf.py "
            "on the merged model"
        )
    return hf_arch, SUPPORTED_ARCHITECTURES[hf_arch]


def verify_gguf(path: str | os.PathLike, *, arch: str, tensor_count: int, vocab_size: int | None = None) -> dict[str, Any]:
    """Read a written file back with gguf's own reader; raise StepError when it is not whole."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # a truncated or corrupt file
        raise StepError(f"{path} cannot be read back as GGUF ({type(exc).__name__}: {exc}); run export again") from exc

    def value(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    problems = []
    if value("general.architecture") != arch:
        problems.append(f"architecture {value('general.architecture')!r} instead of {arch!r}")
    if len(reader.tensors) != tensor_count:
        problems.append(f"{len(reader.tensors)} tensors instead of {tensor_count}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens.data) if tokens is not None else 0
    if not n_tokens or value("tokenizer.ggml.model") is None:
        problems.append("no tokenizer")
    elif vocab_size is not None and n_tokens != vocab_size:
        problems.append(f"{n_tokens} tokens instead of {vocab_size}")
    if problems:
        raise StepError(f"{path} is not a complete GGUF file: {'; '.join(problems)}; run export again")
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return {
        "arch": arch,
        "tensor_count": len(reader.tensors),
        "tensor_types": types,
        "vocab_size": n_tokens,
        "chat_template": value("tokenizer.chat_template") is not None,
    }


# ---------------------------------------------------------------------------- tokenizer


def read_vocab(model_dir: Path, config: dict[str, Any]) -> _Vocab:
    """The tokenizer as llama.cpp's BPE vocabulary, or UnsupportedArchitecture saying why not."""
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        what = "a sentencepiece tokenizer (tokenizer.model)" if (model_dir / "tokenizer.model").is_file() else "no tokenizer.json"
        raise UnsupportedArchitecture(
            f"cannot export the tokenizer of {model_dir}: it has {what}; GGUF export supports "
            "byte-level BPE tokenizers saved as tokenizer.json (GPT-2, Llama 3, Qwen2, SmolLM style)"
        )
    tj = _read_json(tj_path)
    tc = _read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").is_file() else {}
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get(
        "end_of_word_suffix"
    ):
        raise UnsupportedArchitecture(
            f"cannot export the tokenizer of {model_dir}: its model is {model.get('type')!r}"
            f"{' with byte fallback (sentencepiece style)' if model.get('byte_fallback') else ''}; "
            "GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM style)"
        )
    notes: list[str] = []
    pre = _pre_tokenizer_name(tj.get("pre_tokenizer"), model_dir)
    normalizer = tj.get("normalizer")
    if normalizer is not None:
        if normalizer.get("type") != "NFC":
            raise UnsupportedArchitecture(
                f"cannot export the tokenizer of {model_dir}: its normalizer {normalizer.get('type')!r} "
                "has no llama.cpp equivalent"
            )
        notes.append("tokenizer NFC normalizer not applied by llama.cpp (same ids for NFC text)")
    if bool(model.get("ignore_merges")) != (pre == "llama-bpe"):
        notes.append(f"tokenizer ignore_merges={bool(model.get('ignore_merges'))}; llama.cpp uses it only for llama-bpe")

    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {int(t["id"]): t for t in tj.get("added_tokens") or []}
    for token_id, tok in added.items():
        vocab[tok["content"]] = token_id
    n_model = int(config.get("vocab_size") or 0)
    n_tok = max(vocab.values()) + 1 if vocab else 0
    if n_model and n_tok > n_model:
        raise UnsupportedArchitecture(
            f"the tokenizer of {model_dir} has {n_tok} tokens but the model only {n_model} embeddings: "
            "resize the embeddings (model.resize_token_embeddings) before exporting"
        )
    size = max(n_model, n_tok)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    normal, control, user_defined, unused = 1, 3, 4, 5  # gguf.TokenType
    for i in range(size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(control if added[i].get("special") else user_defined)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(normal)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(unused)
    if size > n_tok:
        notes.append(f"{size - n_tok} embedding rows beyond the tokenizer written as unused [PAD] tokens")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    def token_id(key: str) -> int | None:
        value = tc.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in vocab:
            return vocab[value]
        fallback = config.get(f"{key}_id")
        return fallback if isinstance(fallback, int) else None

    eot_id = next((vocab[t] for t in END_OF_TURN_TOKENS[:4] if t in vocab), None)
    add_bos, add_eos = _adds_special_tokens(tj_path, token_id("bos_token"), token_id("eos_token"))
    return _Vocab(
        tokens=tokens,
        types=types,
        merges=merges,
        pre=pre,
        bos_id=token_id("bos_token"),
        eos_id=token_id("eos_token"),
        pad_id=token_id("pad_token"),
        unk_id=token_id("unk_token"),
        eot_id=eot_id,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=_chat_template(model_dir, tc),
        notes=notes,
    )


def _pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None, model_dir: Path) -> str:
    steps = []
    items = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" else [pre_tokenizer]
    for step in items or []:
        kind = (step or {}).get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space"):
            steps.append("bytelevel+regex" if step.get("use_regex", True) else "bytelevel")
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = step.get("pattern") or {}
            steps.append("split:" + str(pattern.get("Regex", pattern.get("String"))))
        elif kind == "Digits" and step.get("individual_digits"):
            steps.append("digits:individual")
        else:
            steps.append(json.dumps(step, sort_keys=True))
    pre = PRE_TOKENIZERS.get(tuple(steps))
    if pre is None:
        raise UnsupportedArchitecture(
            f"cannot export the tokenizer of {model_dir}: its pre-tokenizer ({'; '.join(steps) or 'none'}) "
            "is not one llama.cpp reproduces; supported: GPT-2 byte-level, Llama 3, Qwen2 and SmolLM splits"
        )
    return pre


def _adds_special_tokens(tj_path: Path, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
    """Whether encoding adds BOS/EOS, as the saved tokenizer's post-processor does it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tj_path))
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    extra_front = full[: len(full) - len(plain)] if full[-len(plain):] == plain else full[:1]
    add_bos = bos_id is not None and len(full) > len(plain) and bos_id in extra_front
    add_eos = eos_id is not None and len(full) > len(plain) and full[-1] == eos_id
    return add_bos, add_eos


def _chat_template(model_dir: Path, tc: dict[str, Any]) -> str | None:
    template: Any = None
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    elif (model_dir / "chat_template.json").is_file():
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
    else:
        template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return strip_generation_tags(template) if isinstance(template, str) and template else None


def _write_vocab(writer, vocab: _Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for setter, value in (
        (writer.add_bos_token_id, vocab.bos_id),
        (writer.add_eos_token_id, vocab.eos_id),
        (writer.add_pad_token_id, vocab.pad_id),
        (writer.add_unk_token_id, vocab.unk_id),
        (writer.add_eot_token_id, vocab.eot_id),
    ):
        if value is not None:
            setter(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# ---------------------------------------------------------------------------- model


def _plan(model_dir, config, hf_arch, arch, quantization, vocab_size, notes):
    """Hyperparameters and the tensors to write, in order, with their layout transforms."""
    import gguf

    sources = _tensor_sources(model_dir)
    n_layers = int(config.get("n_layer") or config.get("num_hidden_layers"))
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    hparams: dict[str, Any] = {}
    transforms: dict[str, Callable[[Any], Any]] = {}
    skip = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")
    tied = bool(config["tie_word_embeddings"]) if config.get("tie_word_embeddings") is not None else "lm_head.weight" not in sources
    extra: list[_Planned] = []

    if arch == "gpt2":
        act = config.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise UnsupportedArchitecture(f"GPT-2 with activation {act!r} is not supported by llama.cpp's gpt2 graph")
        if config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights") is False:
            raise UnsupportedArchitecture("GPT-2 with non-standard attention scaling is not supported by llama.cpp")
        if act == "gelu":
            notes.append("exact GELU written as llama.cpp's tanh GELU (differences ~1e-3)")
        n_embd = int(config["n_embd"])
        hparams = {
            "context_length": int(config.get("n_positions") or config.get("n_ctx")),
            "embedding_length": n_embd,
            "feed_forward_length": int(config.get("n_inner") or 4 * n_embd),
            "block_count": n_layers,
            "head_count": int(config["n_head"]),
            "layer_norm_eps": float(config.get("layer_norm_epsilon", 1e-5)),
        }
        # Conv1D stores weights as [in, out]; ggml wants [out, in] like nn.Linear.
        for suffix in (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"):
            transforms[suffix] = lambda w: w.T
    else:
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitecture(f"{hf_arch} with activation {config.get('hidden_act')!r} is not supported")
        if arch == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
            raise UnsupportedArchitecture(f"{hf_arch} with attention/MLP biases is not supported by this exporter")
        if arch == "qwen2" and config.get("use_sliding_window"):
            raise UnsupportedArchitecture("Qwen2 with use_sliding_window=true is not supported by llama.cpp's qwen2 graph")
        hidden, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
        n_kv = int(config.get("num_key_value_heads") or n_head)
        head_dim = int(config.get("head_dim") or hidden // n_head)
        rope = dict(config.get("rope_parameters") or {})
        rope.update(config.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        hparams = {
            "context_length": int(config["max_position_embeddings"]),
            "embedding_length": hidden,
            "feed_forward_length": int(config["intermediate_size"]),
            "block_count": n_layers,
            "head_count": n_head,
            "head_count_kv": n_kv,
            "rope_dimension_count": head_dim,
            "rope_freq_base": theta,
            "layer_norm_rms_eps": float(config.get("rms_norm_eps", 1e-6)),
        }
        if head_dim != hidden // n_head:
            hparams["key_length"] = hparams["value_length"] = head_dim
        rope_type = str(rope.get("rope_type", rope.get("type", "default")) or "default").lower()
        if rope_type == "linear":
            hparams["rope_scaling"] = ("linear", float(rope["factor"]))
        elif rope_type == "llama3" and arch == "llama":
            factors = _llama3_rope_factors(rope, theta, head_dim)
            extra.append(_Planned("rope_freqs.weight", factors.shape, gguf.GGMLQuantizationType.F32, lambda: factors))
        elif rope_type != "default":
            raise UnsupportedArchitecture(f"{hf_arch} with rope scaling {rope_type!r} is not supported by this exporter")
        window = config.get("sliding_window")
        if hf_arch == "MistralForCausalLM" and window and int(window) < hparams["context_length"]:
            notes.append(f"sliding window {window} not represented: llama.cpp attends to the full context")
        if arch == "llama":  # llama.cpp's rope for llama expects Q/K rows interleaved per head
            transforms[".self_attn.q_proj.weight"] = lambda w: _permute_qk(w, n_head, n_head)
            transforms[".self_attn.k_proj.weight"] = lambda w: _permute_qk(w, n_head, n_kv)

    planned: list[_Planned] = []
    seen: set[str] = set()
    for hf_name, (path, shape, _dtype) in sources.items():
        if skip.search(hf_name):
            continue
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp and transformers reuse token_embd for the output
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedArchitecture(f"tensor {hf_name} of {hf_arch} has no GGUF counterpart; cannot export")
        transform = next((fn for suffix, fn in transforms.items() if hf_name.endswith(suffix)), None)
        out_shape = tuple(reversed(shape)) if (transform is not None and arch == "gpt2") else tuple(shape)
        qtype = _tensor_qtype(gguf_name, out_shape, quantization)
        planned.append(_Planned(gguf_name, out_shape, qtype, _loader(path, hf_name, transform)))
        seen.add(gguf_name)
    required = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
    if missing := sorted(required - seen):
        raise StepError(f"{model_dir} lacks tensors {', '.join(missing)}; save the merged model again", exit_code=2)
    embd_rows = next(t.shape[0] for t in planned if t.name == "token_embd.weight")
    if embd_rows != vocab_size:
        raise StepError(f"token_embd has {embd_rows} rows but the vocabulary {vocab_size} tokens", exit_code=2)
    hparams["vocab_size"] = vocab_size
    for t in extra:
        planned.append(t)
    return planned, hparams


def _tensor_qtype(gguf_name: str, shape: tuple[int, ...], quantization: str):
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2 or "norm" in gguf_name:
        return Q.F32
    wanted = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quantization]
    if wanted in (Q.Q8_0, Q.Q4_0) and shape[-1] % 32 != 0:
        return Q.F16
    return wanted


def _permute_qk(weights, n_head: int, n_head_kv: int):
    """HF's half-split rotary layout → llama.cpp's interleaved one (convert_hf_to_gguf.py's permute)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _llama3_rope_factors(rope: dict[str, Any], theta: float, head_dim: int):
    import numpy as np

    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _tensor_sources(model_dir: Path) -> dict[str, tuple[Path, list[int], str]]:
    """Every tensor in the model's safetensors files: name → (file, shape, dtype)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise StepError(f"{model_dir} has no *.safetensors files; save the model with safe_serialization", exit_code=2)
    out: dict[str, tuple[Path, list[int], str]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                out[key] = (path, list(piece.get_shape()), piece.get_dtype())
    return out


def _loader(path: Path, name: str, transform):
    """Reads one tensor in its stored dtype (transforms are layout changes: no conversion)."""

    def load():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            data = handle.get_tensor(name)
        return transform(data) if transform is not None else data

    return load


def _tensor_data(t: _Planned):
    """The bytes of one planned tensor as a numpy array: converted once, from the stored dtype."""
    import gguf
    import numpy as np
    import torch

    data = t.load()
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    Q = gguf.GGMLQuantizationType
    if t.qtype == Q.Q8_0:
        out = quantize_q8_0(data)
    else:
        dtype = torch.float16 if t.qtype == Q.F16 else torch.float32
        # F32/F16: already the target dtype, gguf.quants.quantize only checks it; others convert there.
        out = gguf.quants.quantize(data.to(dtype, memory_format=torch.contiguous_format).numpy(), t.qtype)
    if tuple(out.shape[:-1]) != tuple(t.shape[:-1]):
        raise StepError(f"tensor {t.name} has shape {tuple(data.shape)}, expected {t.shape}; cannot export")
    return out


Q8_0_BLOCK = 32
Q8_0_CHUNK_BLOCKS = 8192  # blocks converted at a time: temporaries stay in the CPU caches
# The largest float32 below 0.5: trunc(x + copysign(Q8_0_HALF, x)) equals C's roundf(x) (half
# away from zero, as ggml rounds) for every float32 |x| <= 128, ties and 0.49999997 included
# (checked exhaustively), where adding 0.5 would round 0.49999997 up.
Q8_0_HALF = 0.49999997


def quantize_q8_0(tensor):
    """ggml's Q8_0 of a float tensor whose last dimension is a multiple of 32, as a uint8 numpy
    array of shape (*leading, last // 32 * 34): per block of 32 values, the scale
    d = max|x| / 127 as float16, then the 32 values round(x / d) as int8.

    Bit-identical to ggml's quantize_row_q8_0_ref and gguf.quants.quantize (same float32
    operations in the same order); works in chunks, from any stored float dtype.
    """
    import numpy as np
    import torch

    if tensor.shape[-1] % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs rows that are a multiple of {Q8_0_BLOCK} values, got shape {tuple(tensor.shape)}")
    blocks = tensor.reshape(-1, Q8_0_BLOCK)
    count = blocks.shape[0]
    out = np.empty((count, 2 + Q8_0_BLOCK), dtype=np.uint8)
    target = torch.from_numpy(out)
    for start in range(0, count, Q8_0_CHUNK_BLOCKS):
        end = min(start + Q8_0_CHUNK_BLOCKS, count)
        x = blocks[start:end].to(torch.float32)
        scale = x.abs().amax(dim=1, keepdim=True) / 127
        inverse = torch.where(scale == 0, 0.0, 1.0 / scale)
        scaled = x * inverse
        scaled.add_(scaled.sign(), alpha=Q8_0_HALF)  # then the int8 cast truncates: roundf
        target[start:end, :2] = scale.to(torch.float16).view(torch.uint8)
        target[start:end, 2:] = scaled.to(torch.int8).view(torch.uint8)
    return out.reshape(*tensor.shape[:-1], tensor.shape[-1] // Q8_0_BLOCK * (2 + Q8_0_BLOCK))


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf.quants import quant_shape_to_byte_shape

    return int(math.prod(quant_shape_to_byte_shape(shape, qtype)))


def _write_metadata(writer, arch, hparams, quantization, name, base_model, finetune, description) -> None:
    import gguf

    writer.add_type("model")
    writer.add_name(name)
    writer.add_basename(name)
    if finetune:
        writer.add_finetune(finetune)
    base = base_model_metadata(base_model)
    if base:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base["name"])
        if base.get("repo_id"):
            organization = base["repo_id"].split("/")[0]
            writer.add_base_model_organization(0, organization)
            writer.add_base_model_repo_url(0, f"https://huggingface.co/{base['repo_id']}")
        if base.get("version"):
            writer.add_base_model_version(0, base["version"])
    if not description:
        of = base["name"] if base else "an unnamed base model"
        if base and base.get("quantization"):
            of += f" (from its {base['quantization']} GGUF)"
        description = f"{name}: LoRA chat fine-tune of {of}, merged and exported as {quantization}"
    writer.add_description(description)
    writer.add_context_length(hparams["context_length"])
    writer.add_embedding_length(hparams["embedding_length"])
    writer.add_feed_forward_length(hparams["feed_forward_length"])
    writer.add_block_count(hparams["block_count"])
    writer.add_head_count(hparams["head_count"])
    writer.add_vocab_size(hparams["vocab_size"])
    if arch == "gpt2":
        writer.add_layer_norm_eps(hparams["layer_norm_eps"])
    else:
        writer.add_head_count_kv(hparams["head_count_kv"])
        writer.add_rope_dimension_count(hparams["rope_dimension_count"])
        writer.add_rope_freq_base(hparams["rope_freq_base"])
        writer.add_layer_norm_rms_eps(hparams["layer_norm_rms_eps"])
        if "key_length" in hparams:
            writer.add_key_length(hparams["key_length"])
            writer.add_value_length(hparams["value_length"])
        if "rope_scaling" in hparams:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(hparams["rope_scaling"][1])
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[quantization]
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def base_model_metadata(base_model: str | dict[str, str] | None) -> dict[str, str] | None:
    """``{"name", "repo_id"?, "version"?, "quantization"?}`` from a base model's identity
    (model.base_models.BaseModelChoice.identity) or a bare name; a name that is a hub repo id
    counts as one."""
    if not base_model:
        return None
    base = {"name": base_model} if isinstance(base_model, str) else {k: v for k, v in base_model.items() if v}
    if not base.get("name"):
        return None
    if "repo_id" not in base and re.fullmatch(r"[\w.-]+/[\w.-]+", base["name"]):
        base["repo_id"] = base["name"]
    return base


def apply_default_mode(path: Path) -> None:
    """Give a temporary file/dir (created 0600/0700) the mode a plain open() would: others on a
    shared volume (e.g. an Ollama pod with another uid) must be able to read the result."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def load_config(model_dir: Path) -> dict[str, Any]:
    """config.json with the config class's defaults filled in (save_pretrained leaves defaults out)."""
    raw = _read_json(model_dir / "config.json")
    try:
        from transformers import AutoConfig

        full = AutoConfig.from_pretrained(str(model_dir)).to_dict()
    except Exception:  # an unknown model_type: the architecture check reports it
        return raw
    return {**full, **raw, "tie_word_embeddings": full.get("tie_word_embeddings", raw.get("tie_word_embeddings"))}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise StepError(f"{path} is missing; the model directory is incomplete", exit_code=2) from exc
