"""The two settings the configure step resolves before training: how long, and how fast.

- Training length: ``trainingSteps`` as set, or ``epochs`` passes over the packed training
  sequences, ``ceil(epochs × sequences / batchSize)`` optimizer steps (the recipe draws
  ``batchSize`` sequences per step from shuffled epochs), or DEFAULT_TRAINING_STEPS.
- Peak learning rate: ``learningRate`` as set always wins; unset, it follows the base model,
  however it was named (preset, hub id, path, GGUF file): 1e-3 for a model built from a config
  (all its weights train from a random start), else by the base's size for LoRA, from
  LORA_LEARNING_RATES. The result says which was used and why.
"""

from __future__ import annotations

import math
from typing import Any

from chatbot_api.spec import DEFAULT_TRAINING_STEPS

from chatbot_trainer.train.hardware import training_bytes

SCRATCH_LEARNING_RATE = 1e-3
# (up to this many parameters, LoRA learning rate); the last entry has no bound
LORA_LEARNING_RATES: tuple[tuple[float, float], ...] = (
    (1.0e9, 3e-4),  # SmolLM2 135M/360M, GPT-2, Qwen2.5 0.5B: measured on SmolLM2-135M (README)
    (1.5e10, 2e-4),  # 1B to 14B: the usual LoRA value (QLoRA's 7B/13B recipes)
    (math.inf, 1e-4),  # larger models
)


def parameter_count(model_config: dict[str, Any]) -> int:
    """Parameters of a decoder of this shape (embeddings + attention + MLP), from its config."""
    return training_bytes(model_config)[0] // 4


def resolve_learning_rate(params, model_config: dict[str, Any], scratch: bool) -> tuple[float, str]:
    """(peak learning rate, why that one)."""
    if params.learning_rate is not None:
        return params.learning_rate, "learningRate as set"
    if scratch:
        return SCRATCH_LEARNING_RATE, "default for a model built from a config (all weights train)"
    count = parameter_count(model_config)
    for bound, rate in LORA_LEARNING_RATES:
        if count <= bound:
            size = f"{count / 1e9:.2g}B" if count >= 1e9 else f"{count / 1e6:.0f}M"
            limit = "" if math.isinf(bound) else f" (up to {bound / 1e9:g}B parameters)"
            return rate, f"LoRA default for a base of about {size} parameters{limit}; set learningRate to change it"
    raise AssertionError("LORA_LEARNING_RATES ends without a bound")


def resolve_training_steps(params, count_sequences) -> dict[str, Any]:
    """{"training_steps", "training_steps_reason", and with epochs "epochs", "train_sequences"}.
    `count_sequences()` gives the number of packed training sequences (called only for epochs)."""
    if params.epochs is None:
        steps = params.training_steps or DEFAULT_TRAINING_STEPS
        chosen = params.training_steps is not None and "training_steps" in params.model_fields_set
        return {"training_steps": steps, "training_steps_reason": "trainingSteps as set" if chosen
                else "default (neither trainingSteps nor epochs set)"}
    sequences = count_sequences()
    if sequences <= 0:
        raise ValueError("no training sequence to count epochs over")
    steps = max(1, math.ceil(params.epochs * sequences / params.batch_size))
    return {
        "training_steps": steps,
        "training_steps_reason": f"epochs {params.epochs:g} × {sequences} packed training sequences "
        f"/ batchSize {params.batch_size}, rounded up",
        "epochs": params.epochs,
        "train_sequences": sequences,
    }
