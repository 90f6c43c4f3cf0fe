"""Loss and token accuracy on the assistant's tokens.

``token_loss_sums`` is the one loss computation, shared by training and evaluation: run the
decoder, keep the hidden states of the positions that predict an assistant token
(``Batch.loss_index``), apply the output layer to those only (in chunks when the vocabulary
is big) and return per-batch sums. Logits of the prompt tokens are never computed and logits
are never accumulated across batches.

In training, the output layer and the cross-entropy are one chunked autograd function
(``linear_cross_entropy_sum``): each chunk's gradients are computed in the forward pass, so
at most one chunk of logits exists at any time, also for the backward pass (with a 150k-token
vocabulary the logits of a micro-batch would otherwise be the largest tensor of the step).

For architectures whose causal-LM head does more than a linear layer (logit soft-capping,
scaling, …) the full model forward is used instead and its logits are indexed the same way.
"""

from __future__ import annotations

from chatbot_trainer.data.packing import Batch, model_inputs

# Causal-LM heads that are exactly `lm_head(final_hidden_state)`.
LINEAR_HEAD_ARCHITECTURES = frozenset(
    {"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "starcoder2", "olmo", "olmo2", "smollm3"}
)

# In training, larger chunks (256 MB of float32 logits): fewer, larger matrix products, still
# a fraction of the logits of a whole micro-batch with a 150k-token vocabulary.
TRAIN_LOGITS_PER_CHUNK = 1 << 26


def base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def compute_dtype(model):
    """The dtype activations run in (autocast dtype when autocast is on)."""
    import torch

    for device_type in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _linear_cross_entropy_class():
    import torch

    from chatbot_trainer.model import cpu_blas

    class LinearCrossEntropySum(torch.autograd.Function):
        """sum_i CE(hidden_i @ weight.T, target_i), chunk by chunk; the gradients for hidden and
        weight are computed in the forward pass (the loss is the graph's end: the incoming
        gradient is a scalar that only scales them), so no logits are kept for backward.

        Per chunk the (rows × vocabulary) logits are touched four times after the product: max,
        subtract it and exponentiate (in place), row sums. The softmax's division by the row
        sums is applied to the (rows × hidden) product instead:
        d hidden = ((exps - sums · one_hot) @ weight) / sums, with exps = exp(logits - max)."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk):
            need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                part, part_targets = hidden[start : start + chunk], targets[start : start + chunk]
                logits = cpu_blas.linear(part, weight).float()
                target_logits = logits.gather(1, part_targets[:, None]).squeeze(1)
                peak = logits.amax(dim=-1, keepdim=True)
                exps = logits.sub_(peak).exp_()  # in place: the logits are not needed any more
                sums = exps.sum(dim=-1)
                total += (peak.squeeze(1) + sums.log() - target_logits).sum()
                if need_hidden or need_weight:
                    # softmax - one_hot = (exps - sums at the targets) / sums; the subtraction
                    # stays in float32 (it decides the gradient of confident predictions)
                    rows = torch.arange(part_targets.shape[0], device=part_targets.device)
                    exps[rows, part_targets] -= sums
                    inverse = sums.reciprocal()[:, None]
                    exps = exps.to(weight.dtype)  # (autocast casts the products)
                    if need_hidden:
                        grad_hidden[start : start + chunk] = cpu_blas.mm(exps, weight).mul_(inverse)
                    if need_weight:
                        grad_weight += (exps.t() @ (part.float() * inverse).to(part.dtype)).float()
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
            return total

        @staticmethod
        def backward(ctx, grad_output):
            grad_hidden, grad_weight = ctx.saved_tensors
            return (
                grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None,
                None,
                None,
            )

    return LinearCrossEntropySum


_LINEAR_CROSS_ENTROPY = None


def linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens: int):
    """Sum over rows of cross_entropy(hidden @ weight.T, targets) (logits in float32), with at
    most ``chunk_tokens`` rows of logits alive at once, in the forward and the backward pass."""
    global _LINEAR_CROSS_ENTROPY
    if _LINEAR_CROSS_ENTROPY is None:
        _LINEAR_CROSS_ENTROPY = _linear_cross_entropy_class()
    return _LINEAR_CROSS_ENTROPY.apply(hidden, weight, targets, max(1, int(chunk_tokens)))


def _plain_linear(module) -> bool:
    import torch

    return type(module) is torch.nn.Linear and module.bias is None


def token_loss_sums(
    model,
    batch: Batch,
    *,
    attention_mode: str = "position_ids",
    chunk_tokens: int | None = None,
    with_accuracy: bool = False,
):
    """Sum of cross-entropy over the batch's label tokens, and (optionally) the number of
    correct argmax predictions, as 0-d tensors on the model's device (no host sync).

    ``chunk_tokens`` bounds how many label positions go through the output layer at once
    (None: as many as ``TRAIN_LOGITS_PER_CHUNK`` allows in training, all at once otherwise). With
    gradients enabled and a plain linear output layer, the output layer and the loss run as
    ``linear_cross_entropy_sum``.
    """
    import torch
    import torch.nn.functional as F

    base = base_of(model)
    inputs = model_inputs(
        batch,
        attention_mode,
        attn_implementation=getattr(base.config, "_attn_implementation", None) or "sdpa",
        dtype=compute_dtype(model),
    )
    targets = batch.loss_targets
    if base.config.model_type in LINEAR_HEAD_ARCHITECTURES:
        out = base.get_decoder()(**inputs)
        hidden = out.last_hidden_state
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.loss_index)
        head = base.get_output_embeddings()
    else:
        logits = base(**inputs).logits
        selected = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.loss_index)
        head = None

    total = targets.shape[0]
    if head is not None and not with_accuracy and torch.is_grad_enabled() and _plain_linear(head):
        vocab = head.weight.shape[0]
        chunk = chunk_tokens or TRAIN_LOGITS_PER_CHUNK // vocab
        return linear_cross_entropy_sum(selected, head.weight, targets, chunk)
    step = total if not chunk_tokens else max(1, chunk_tokens)
    loss_sum = None
    correct = None
    for start in range(0, max(total, 1), max(step, 1)):
        part = selected[start : start + step]
        logits = (head(part) if head is not None else part).float()
        part_targets = targets[start : start + step]
        ce = F.cross_entropy(logits, part_targets, reduction="sum")
        loss_sum = ce if loss_sum is None else loss_sum + ce
        if with_accuracy:
            hits = (logits.argmax(dim=-1) == part_targets).sum()
            correct = hits if correct is None else correct + hits
    if with_accuracy:
        return loss_sum, correct
    return loss_sum


