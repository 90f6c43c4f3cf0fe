"""Step 2, configure: resolve spec + defaults + model preset + hardware into one config.

Everything the later steps need is decided here and written to `configure/config.json`, so a
run can be read back and reproduced: the base model (and, for a model built from a config or
dequantized from a GGUF file, the model itself, saved under `configure/base-model/`), the
number of training steps (``epochs`` resolved over the packed training sequences) and the peak
learning rate (learningRate, or the base model's default: train/defaults.py), warmup, LoRA
target modules, and the device, precision and micro-batch size for the hardware configure sees
(train and evaluate decide those again on their own nodes: see train/hardware.py). Checks that can fail early do so here
(unknown model, an architecture the GGUF export does not support) rather than after training.
"""

from __future__ import annotations

import math
from typing import Any

from chatbot_trainer.data.dataset import load_jsonl
from chatbot_trainer.errors import InvalidConfig, InvalidData, ModelNotFound
from chatbot_trainer.model.base_models import (
    ModelNotFoundError,
    materialize_base_model,
    resolve_base_model,
)
from chatbot_trainer.train import hardware
from chatbot_trainer.train.defaults import resolve_learning_rate, resolve_training_steps
from chatbot_trainer.workspace import StepContext, write_json_atomic


def _hf_config(name_or_path: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as exc:
        raise ModelNotFound(
            f"cannot load the config of {name_or_path}: {exc}. Check modelType, network access "
            "to the hub, or HF_TOKEN for gated models (spec.envFromSecret)"
        ) from exc
    return config


def _check_exportable(name_or_path: str) -> str:
    """Fail now, not after training, when GGUF export cannot handle the model or its tokenizer."""
    from pathlib import Path

    from chatbot_trainer.export.gguf_writer import preflight

    local = Path(name_or_path)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.jinja", "tokenizer.model"]))
        except Exception as exc:  # hub errors come in many types; all mean the same here
            raise ModelNotFound(f"cannot fetch the config and tokenizer of {name_or_path}: {exc}") from exc
    return preflight(local)


def _import_gguf(choice, out, show_progress: bool) -> dict[str, Any]:
    """Dequantize a GGUF base into configure/base-model/ (fetching an https:// file first)."""
    from pathlib import Path

    from chatbot_trainer.data.dataset import DataError, resolve_source
    from chatbot_trainer.model.gguf_import import import_gguf

    location = choice.name_or_path
    if location.startswith(("http://", "https://")):
        try:
            local = resolve_source(location, cache_dir=out / "download", timeout=600.0)
        except DataError as exc:
            raise ModelNotFound(f"cannot fetch the GGUF base model: {exc}") from exc
    else:
        local = Path(location)
    info = import_gguf(local, out / "base-model", show_progress=show_progress)
    return {**info, "source": location}


def _check_chat_template(tokenizer, label: str, data_report: dict[str, Any], params) -> dict[str, Any]:
    """Before training: can the template express the data's tool calls; its default system prompt."""
    from chatbot_trainer.data.chat_templates import check_chat_template

    return check_chat_template(tokenizer, label, data_report, params.data.max_bad_line_fraction,
                               chat_template=params.chat_template)


def _count_train_sequences(tokenizer, train_path: str, params) -> int:
    """The packed (or padded) training sequences, as the train step builds them."""
    from chatbot_trainer.data.packing import build_sequences
    from chatbot_trainer.data.tokenization import tokenize_dataset

    examples, tokenization = tokenize_dataset(tokenizer, load_jsonl(train_path), params.max_seq_length)
    if not examples:
        raise InvalidData(
            f"no training conversation fits maxSeqLength {params.max_seq_length} with assistant tokens "
            f"({tokenization}): raise maxSeqLength or check the data"
        )
    return len(build_sequences(examples, params.max_seq_length, params.packing))


def run(ctx: StepContext) -> dict[str, Any]:
    prepared = ctx.read_result("prepare")
    from chatbot_trainer.model.loading import default_target_modules, load_tokenizer_with_template

    params = ctx.params
    out = ctx.step_dir("configure")
    try:
        choice = resolve_base_model(params.model_type)
    except ModelNotFoundError as exc:
        raise ModelNotFound(str(exc)) from exc

    imported = None
    if choice.source == "gguf":
        imported = _import_gguf(choice, out, ctx.show_progress)
        base_path = imported["model_dir"]
    else:
        train_conversations = load_jsonl(prepared["train_path"]) if choice.source == "scratch" else []
        base_path = materialize_base_model(
            choice, out / "base-model", train_conversations, params.max_seq_length, params.seed
        )
    base_label = choice.label if imported is None else f"{choice.label}, from {imported['quantization']}"
    hf_config = _hf_config(base_path)
    architecture = (hf_config.architectures or [type(hf_config).__name__])[0]
    gguf_architecture = _check_exportable(base_path)
    tokenizer, _ = load_tokenizer_with_template(base_path, params.chat_template, base_label)
    chat_template = _check_chat_template(tokenizer, base_label, prepared["report"], params)
    length = resolve_training_steps(
        params, lambda: _count_train_sequences(tokenizer, prepared["train_path"], params))
    steps = length["training_steps"]
    if params.warmup_steps is not None and params.warmup_steps >= steps:
        raise InvalidConfig(f"warmupSteps {params.warmup_steps} must be less than the {steps} training "
                            f"steps ({length['training_steps_reason']})")
    learning_rate, learning_rate_reason = resolve_learning_rate(
        params, hf_config.to_dict(), scratch=choice.source == "scratch")

    node = hardware.resolve(params, model_config=hf_config.to_dict())  # train/evaluate resolve again on their nodes
    warmup = params.warmup_steps if params.warmup_steps is not None else math.ceil(0.03 * steps)
    target_modules = (
        params.lora.target_modules or default_target_modules(hf_config.model_type) or "all-linear"
    )
    config = {
        "name": ctx.name,
        "params": params.to_api(),
        "base_model": {**choice.to_dict(), "label": base_label},
        "base_model_path": base_path,
        "base_model_import": imported,
        **length,
        "learning_rate": learning_rate,
        "learning_rate_reason": learning_rate_reason,
        "architecture": architecture,
        "gguf_architecture": gguf_architecture,
        **node,
        "warmup_steps": warmup,
        "model_family": hf_config.model_type,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "train_base_weights": choice.source == "scratch",
        "chat_template": chat_template,
    }
    write_json_atomic(out / "config.json", config)
    return {
        **config,
        "summary": {
            "base_model": base_label,
            "training_steps": steps,
            "learning_rate": learning_rate,
            "device": node["device"],
            "precision": node["precision"],
            "micro_batch_size": node["micro_batch_size"],
            "gradient_accumulation_steps": node["gradient_accumulation_steps"],
            "tools": chat_template["tools"],
            "default_system_prompt": chat_template["default_system_prompt"],
            **({"warnings": chat_template["warnings"]} if chat_template["warnings"] else {}),
        },
    }
