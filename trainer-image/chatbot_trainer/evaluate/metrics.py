"""Eval loss, assistant-token accuracy and perplexity of a model on held-out conversations."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from chatbot_trainer.data.packing import (
    attn_implementation,
    build_sequences,
    choose_attention_mode,
    micro_batches,
    register_segments_attention,
    set_attn_implementation,
)
from chatbot_trainer.model.loss import base_of, token_loss_sums

LOGITS_PER_CHUNK = 1 << 24  # chunk size (tokens × vocabulary) for the output layer

def evaluate_model(
    model,
    examples: Sequence[dict[str, Any]],
    *,
    micro_batch_size: int,
    max_seq_length: int,
    packing: bool,
    device: str | None = None,
    attention_mode: str | None = None,
    pad_token_id: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Loss, token accuracy and perplexity over the assistant tokens of ``examples``.

    ``on_batch(done, total)`` is told the micro-batches done, before each one and at the end
    (live progress).

    loss = sum of token cross-entropies / number of assistant tokens (the same whether the
    examples are packed or not); accuracy = share of assistant tokens whose argmax prediction
    is the label (token-weighted across the whole set); perplexity = exp(loss).
    """
    import torch

    if not examples:
        raise ValueError("no examples to evaluate")
    base = base_of(model)
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    if pad_token_id is None:
        pad_token_id = getattr(base.config, "pad_token_id", None)
    original_attention = attn_implementation(model)
    if packing and attention_mode is None:
        attention_mode = choose_attention_mode(model)
    elif packing and attention_mode == "segments":
        set_attn_implementation(model, register_segments_attention())
    if not packing:
        # Similar lengths side by side: less padding, same result.
        examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    sequences = build_sequences(examples, max_seq_length, packing)
    vocab = int(getattr(base.config, "vocab_size", 0) or 32000)
    chunk_tokens = max(1, LOGITS_PER_CHUNK // vocab)

    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    tokens = 0
    try:
        with torch.inference_mode():
            batches = micro_batches(sequences, micro_batch_size, pad_token_id=pad_token_id, packed=packing)
            for done, batch in enumerate(batches):
                if on_batch is not None:
                    on_batch(done, len(batches))
                if batch.num_label_tokens == 0:
                    continue
                batch = batch.to(device, non_blocking=True)
                ce, hits = token_loss_sums(
                    model,
                    batch,
                    attention_mode=attention_mode or "position_ids",
                    chunk_tokens=chunk_tokens,
                    with_accuracy=True,
                )
                loss_sum += ce.double()
                correct += hits
                tokens += batch.num_label_tokens
            if on_batch is not None:
                on_batch(len(batches), len(batches))
    finally:
        model.train(was_training)
        if attn_implementation(model) != original_attention:
            set_attn_implementation(model, original_attention)
    if tokens == 0:
        raise ValueError("the examples have no assistant tokens to evaluate")
    loss = loss_sum.item() / tokens
    return {
        "loss": loss,
        "accuracy": correct.item() / tokens,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": tokens,
        "examples": len(examples),
    }
