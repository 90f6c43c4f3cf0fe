"""Loading models for the steps: the tokenizer with its chat template, a causal LM, the
fine-tuned model as the train step left it (adapter, maybe trained base weights) and the base
model it started from; and the LoRA target modules of each architecture.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chatbot_trainer.errors import ModelNotFound
from chatbot_trainer.workspace import StepContext

LLAMA_LIKE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **{arch: LLAMA_LIKE_TARGETS for arch in ("llama", "mistral", "qwen2", "qwen3", "smollm3")},
}
ALL_LINEAR = "all-linear"


def default_target_modules(model_or_arch: Any) -> list[str]:
    """LoRA target modules: attention and MLP projections of known architectures.

    For other architectures: the names of all linear layers except the output layer, when a
    model is given, or ``["all-linear"]`` (peft's equivalent) when only a name is known.
    """
    arch = model_or_arch if isinstance(model_or_arch, str) else getattr(model_or_arch.config, "model_type", "")
    if arch in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[arch])
    if isinstance(model_or_arch, str):
        return [ALL_LINEAR]
    import torch
    from transformers.pytorch_utils import Conv1D

    output = model_or_arch.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model_or_arch.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output
    }
    return sorted(names) or [ALL_LINEAR]


def load_tokenizer_with_template(path: str, chat_template: str | None = None, model: str | None = None):
    """The tokenizer at ``path`` with a chat template; returns (tokenizer, added special tokens).

    ``chat_template``: the spec's chatTemplate (a built-in name, a path or pvc:// URI), which
    replaces the tokenizer's own template after a check that it fits the vocabulary
    (InvalidConfig otherwise). Without it, a tokenizer that has no template gets ChatML."""
    from transformers import AutoTokenizer

    from chatbot_trainer.data.chat_templates import choose_chat_template, ensure_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot load the tokenizer of {path}: {exc}") from exc
    if chat_template:
        choose_chat_template(tokenizer, chat_template, model or path)
        added = []
    else:
        added = ensure_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, added


def load_causal_lm(path: str, dtype=None):
    """A causal LM from ``path`` with sdpa attention (the model's default if it has no sdpa)."""
    from transformers import AutoModelForCausalLM

    try:
        try:
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        except ValueError as exc:
            if "sdpa" not in str(exc).lower():
                raise
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise ModelNotFound(f"cannot load the model {path}: {exc}") from exc


@contextmanager
def peft_quietly():
    """peft reads a property that transformers 5 renamed; its FutureWarning is noise for users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# ---------------------------------------------------------------------------- reloading


def _train_result(source: Any) -> dict[str, Any]:
    if isinstance(source, StepContext):
        return source.read_result("train")
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "train" / "result.json"
    return json.loads(path.read_text())


def load_trained_model(source: Any, merge: bool = False, *, device: str | None = None, dtype=None):
    """The fine-tuned model and its tokenizer, as the train step left them.

    ``source``: a StepContext, a workspace directory, a train result.json path or the train
    result dict. ``merge=True`` folds the adapter into the weights (``merge_and_unload``).
    Returns ``(model, tokenizer)``, the model in eval mode.
    """
    from peft import PeftModel

    result = _train_result(source)
    base_path, adapter_path = result["base_model_path_for_adapter"], result["adapter_path"]
    has_tokenizer = Path(adapter_path, "tokenizer_config.json").is_file()
    tokenizer, _ = load_tokenizer_with_template(adapter_path if has_tokenizer else base_path)
    model = load_causal_lm(base_path, dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    with peft_quietly():
        model = PeftModel.from_pretrained(model, adapter_path)
    if merge:
        model = model.merge_and_unload()
    if device:
        model.to(device)
    return model.eval(), tokenizer


def load_base_model(source: Any, *, device: str | None = None, dtype=None):
    """The model before fine-tuning (same vocabulary as the trained one), for comparisons."""
    result = _train_result(source)
    path = result["base_model_path"] if result.get("base_weights_trained") else result["base_model_path_for_adapter"]
    model = load_causal_lm(path, dtype=dtype)
    if device:
        model.to(device)
    return model.eval()
