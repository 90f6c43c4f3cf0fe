"""Step 2, configure: resolve spec + defaults + model preset + hardware into one config.

Everything the later steps need is decided here and written to `configure/config.json`, so a
run can be read back and reproduced: the base model (and, for a model built from a config, the
model itself, saved under `configure/base-model/`), warmup, LoRA target modules, and the
device, precision and micro-batch size for the hardware configure sees (train and evaluate
decide those again on their own nodes: see hardware.py). Checks that can fail early do so here
(unknown model, an architecture the GGUF export does not support) rather than after training.
"""

from __future__ import annotations

import math
from typing import Any

from chatbot_trainer import hardware
from chatbot_trainer.dataset import load_jsonl
from chatbot_trainer.errors import ModelNotFound
from chatbot_trainer.models import ModelNotFoundError, materialize_base_model, resolve_base_model
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

    from chatbot_trainer.gguf_writer import preflight

    local = Path(name_or_path)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.jinja", "tokenizer.model"]))
        except Exception as exc:  # hub errors come in many types; all mean the same here
            raise ModelNotFound(f"cannot fetch the config and tokenizer of {name_or_path}: {exc}") from exc
    return preflight(local)


def run(ctx: StepContext) -> dict[str, Any]:
    prepared = ctx.read_result("prepare")
    from chatbot_trainer.training import default_target_modules

    params = ctx.params
    out = ctx.step_dir("configure")
    try:
        choice = resolve_base_model(params.model_type)
    except ModelNotFoundError as exc:
        raise ModelNotFound(str(exc)) from exc

    train_conversations = load_jsonl(prepared["train_path"]) if choice.source == "scratch" else []
    base_path = materialize_base_model(
        choice, out / "base-model", train_conversations, params.max_seq_length, params.seed
    )
    hf_config = _hf_config(base_path)
    architecture = (hf_config.architectures or [type(hf_config).__name__])[0]
    gguf_architecture = _check_exportable(base_path)

    node = hardware.resolve(params)  # train and evaluate resolve again on their own nodes
    warmup = params.warmup_steps if params.warmup_steps is not None else math.ceil(0.03 * params.training_steps)
    target_modules = (
        params.lora.target_modules or default_target_modules(hf_config.model_type) or "all-linear"
    )
    config = {
        "name": ctx.name,
        "params": params.to_api(),
        "base_model": choice.to_dict(),
        "base_model_path": base_path,
        "architecture": architecture,
        "gguf_architecture": gguf_architecture,
        **node,
        "warmup_steps": warmup,
        "model_family": hf_config.model_type,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "train_base_weights": choice.source == "scratch",
    }
    write_json_atomic(out / "config.json", config)
    return {
        **config,
        "summary": {
            "base_model": choice.label,
            "device": node["device"],
            "precision": node["precision"],
            "micro_batch_size": node["micro_batch_size"],
            "gradient_accumulation_steps": node["gradient_accumulation_steps"],
        },
    }
